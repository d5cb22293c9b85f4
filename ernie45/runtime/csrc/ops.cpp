// The ops as torch sees them (compiled last, in one unit with the files before it): registered with torch's
// dispatcher as torch.ops.ernie45.*, so that torch.compile traces them as ops (their output shapes for tracing:
// `kernels.py`) and the Python binding releases the GIL while they run (the server's event loop keeps answering
// while the engine computes a step). A layer's weights come packed (see `Packed` in layer_blocks.cpp); an op that
// writes the KV cache says so in its schema (Tensor(a!)).

static Step step_of(torch::Tensor cos, torch::Tensor sin, int64_t start, torch::Tensor allowed,
                    torch::Tensor write_at) {
  return Step{std::move(cos), std::move(sin), start, std::move(allowed), std::move(write_at)};
}

static torch::Tensor attention_block(torch::Tensor h, at::TensorList weights, at::IntArrayRef ints,
                                     at::ArrayRef<double> floats, torch::Tensor kbuf, torch::Tensor vbuf,
                                     torch::Tensor cos, torch::Tensor sin, int64_t start, torch::Tensor allowed,
                                     torch::Tensor write_at) {
  Packed p{weights, ints, floats};
  const auto a = AttentionWeights::read(p);
  p.done();
  return attention_step(h, a, kbuf, vbuf, step_of(cos, sin, start, allowed, write_at));
}

static torch::Tensor mlp_block(torch::Tensor h, at::TensorList weights, at::IntArrayRef ints,
                               at::ArrayRef<double> floats) {
  Packed p{weights, ints, floats};
  const auto m = MlpWeights::read(p);
  p.done();
  return mlp_step(h, m);
}

static torch::Tensor decode_dense_stack(torch::Tensor h, at::TensorList weights, at::IntArrayRef ints,
                                        at::ArrayRef<double> floats, at::TensorList caches, torch::Tensor cos,
                                        torch::Tensor sin, int64_t start, torch::Tensor allowed,
                                        torch::Tensor write_at) {
  return dense_stack(h, Packed{weights, ints, floats}, caches, step_of(cos, sin, start, allowed, write_at));
}

static torch::Tensor moe_block(torch::Tensor h, at::TensorList weights, at::IntArrayRef ints,
                               at::ArrayRef<double> floats, at::TensorList w1, at::TensorList s1, at::TensorList w2,
                               at::TensorList s2) {
  Packed p{weights, ints, floats};
  const auto m = MoeWeights::read(p);
  p.done();
  return moe_half(h, m, w1, s1, w2, s2);
}

TORCH_LIBRARY(ernie45, m) {
  m.def("set_prefetch(int bytes) -> int", &set_prefetch);  // no tensor to dispatch on: one kernel for all
  m.def("gemv_bf16(Tensor x, Tensor w, bool bf16_out) -> Tensor");
  m.def("gemv_int8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("gemv_int4(Tensor x, Tensor tiles, Tensor scales_zeros, int group) -> Tensor");
  m.def("rmsnorm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor allowed, float scale) -> Tensor");
  m.def("attention_block(Tensor h, Tensor[] weights, int[] ints, float[] floats, Tensor(a!) kbuf, Tensor(b!) vbuf, "
        "Tensor cos, Tensor sin, int start, Tensor allowed, Tensor write_at) -> Tensor");
  m.def("mlp_block(Tensor h, Tensor[] weights, int[] ints, float[] floats) -> Tensor");
  m.def("dense_stack(Tensor h, Tensor[] weights, int[] ints, float[] floats, Tensor(a!)[] caches, Tensor cos, "
        "Tensor sin, int start, Tensor allowed, Tensor write_at) -> Tensor");
  m.def("moe_block(Tensor h, Tensor[] weights, int[] ints, float[] floats, Tensor[] w1, Tensor[] s1, Tensor[] w2, "
        "Tensor[] s2) -> Tensor");
}

TORCH_LIBRARY_IMPL(ernie45, CPU, m) {
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_int8", &gemv_int8);
  m.impl("gemv_int4", &gemv_int4);
  m.impl("rmsnorm", &rmsnorm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope", &rope);
  m.impl("decode_attention", &decode_attention);
  m.impl("attention_block", &attention_block);
  m.impl("mlp_block", &mlp_block);
  m.impl("dense_stack", &decode_dense_stack);
  m.impl("moe_block", &moe_block);
}
