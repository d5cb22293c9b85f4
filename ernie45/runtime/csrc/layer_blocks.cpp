// A decoder layer's decode step as two calls (compiled after matvec.cpp and fused_ops.cpp, in one unit).

// ---- A decoder layer's decode step in two calls: the attention half and the dense MLP half, each from its
// RMSNorm through its residual add, composed of the ops above in the eager code's order and roundings (so the
// same numbers). One call instead of ~20 torch ops and ~6 module calls from Python per half.

// x2 [M, K] @ W^T in x2's dtype. W is w [N, K] (the bf16 matvec kernel for bf16, torch's linear otherwise) or,
// with sz non-empty, int4 tiles w with their (scale, zero) pairs sz in groups of `group` (the int4 kernel).
static torch::Tensor matvec(torch::Tensor x2, torch::Tensor w, torch::Tensor sz, int64_t group) {
  if (sz.numel()) return gemv_int4(x2.to(torch::kFloat).contiguous(), w, sz, group).to(x2.scalar_type());
  if (x2.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16 && x2.size(1) % 32 == 0)
    return gemv_bf16_to<at::BFloat16>(x2.contiguous(), w);
  return at::linear(x2, w);
}

// Where row b writes this step's K and V: at[b] where the rows write at their own positions (a cache whose rows
// hold different lengths, as continuous batching's slots do), else `start`.
static inline int64_t write_pos(const int64_t* at, int64_t b, int64_t start) { return at ? at[b] : start; }

static const int64_t* rows_at(const torch::Tensor& at, int64_t B, int64_t limit) {
  if (at.numel() == 0) return nullptr;
  TORCH_CHECK(at.scalar_type() == torch::kLong && at.is_contiguous() && at.numel() == B, "write_at: int64 [B]");
  const int64_t* p = at.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(p[b] >= 0 && p[b] < limit, "write_at beyond the cache buffers");
  return p;
}

// h [B, 1, E] -> h + o_proj(attention(rope(qkv_proj(rmsnorm(h))))), writing this position's K and V into the
// cache buffers kbuf, vbuf [B, KV, max_len, D] at `start` (or each row at write_at[b]) and attending over
// positions 0..start (`allowed` [B, start + 1] says which). Each linear comes as (w, sz, group), see matvec.
torch::Tensor decode_attention_block_impl(torch::Tensor h, torch::Tensor ln, double eps, torch::Tensor wqkv,
                                     torch::Tensor sqkv, int64_t gqkv, torch::Tensor wo, torch::Tensor so,
                                     int64_t go, torch::Tensor cos, torch::Tensor sin, torch::Tensor kbuf,
                                     torch::Tensor vbuf, int64_t start, torch::Tensor allowed, double scale,
                                     torch::Tensor write_at) {
  const int64_t B = h.size(0), E = h.size(2), KV = kbuf.size(1), D = kbuf.size(3);
  auto qkv = matvec(rmsnorm(h, ln, eps).view({B, E}), wqkv, sqkv, gqkv);
  TORCH_CHECK(h.size(1) == 1 && start < kbuf.size(2) && qkv.size(1) % D == 0);
  const int64_t N = qkv.size(1) / D, H = N - 2 * KV;
  auto heads = qkv.view({B, 1, N, D}).transpose(1, 2);
  auto qk = rope(heads.narrow(1, 0, H + KV), cos, sin);
  const int64_t* at = rows_at(write_at, B, kbuf.size(2));
  if (at == nullptr) {
    kbuf.narrow(2, start, 1).copy_(qk.narrow(1, H, KV));
    vbuf.narrow(2, start, 1).copy_(heads.narrow(1, H + KV, KV));
  } else {
    for (int64_t b = 0; b < B; ++b) {
      kbuf.select(0, b).narrow(1, at[b], 1).copy_(qk.select(0, b).narrow(0, H, KV));
      vbuf.select(0, b).narrow(1, at[b], 1).copy_(heads.select(0, b).narrow(0, H + KV, KV));
    }
  }
  auto out = decode_attention(qk.narrow(1, 0, H).contiguous(), kbuf.narrow(2, 0, start + 1),
                              vbuf.narrow(2, 0, start + 1), allowed, scale);
  return h + matvec(out.view({B, H * D}), wo, so, go).view({B, 1, E});
}

// h [B, 1, E] -> h + down(silu(gate) * up) of rmsnorm(h), gate|up one matrix; linears as in matvec.
torch::Tensor decode_mlp_block_impl(torch::Tensor h, torch::Tensor ln, double eps, torch::Tensor wgu, torch::Tensor sgu,
                               int64_t ggu, torch::Tensor wd, torch::Tensor sd, int64_t gd) {
  const int64_t B = h.size(0), E = h.size(2);
  auto act = silu_mul(matvec(rmsnorm(h, ln, eps).view({B, E}), wgu, sgu, ggu));
  return h + matvec(act, wd, sd, gd).view({B, 1, E});
}

// Whether the stack can run on raw pointers (`bf16_stack`): bf16 activations and plain bf16 weights (no int4
// tiles) whose input widths take the bf16 matvec, contiguous norms, cache buffers whose last dim is contiguous.
static bool plain_bf16(const torch::Tensor& h, const std::vector<torch::Tensor>& t, size_t n) {
  auto bf16 = [](const torch::Tensor& x) { return x.scalar_type() == torch::kBFloat16 && x.is_contiguous(); };
  if (!bf16(h) || h.size(2) % 32) return false;
  for (size_t i = 0; i < n; ++i) {
    const torch::Tensor* a = t.data() + 12 * i;
    for (int j : {2, 4, 9, 11}) if (a[j].numel()) return false;                  // int4 scales
    for (int j : {0, 1, 3, 7, 8, 10}) if (!bf16(a[j])) return false;             // norms, weights
    for (int j : {1, 3, 8, 10}) if (a[j].size(1) % 32) return false;
    for (int j : {5, 6}) if (a[j].scalar_type() != torch::kBFloat16 || a[j].stride(3) != 1) return false;
  }
  return true;
}

// The dense stack on raw pointers for bf16 weights: the same kernels, in the same order and with the same roundings
// as the tensor code above (so the same numbers), but no ATen op between them. Inside a step every ATen op (a view,
// a narrow, an empty) ran on code and data the streamed weights had pushed out of the caches, ~30 such ops a layer.
static torch::Tensor bf16_stack(torch::Tensor h, const std::vector<torch::Tensor>& t, const std::vector<double>& f,
                                size_t n, const torch::Tensor& cos, const torch::Tensor& sin, int64_t start,
                                const bool* allowed, const int64_t* at) {
  using bf = at::BFloat16;
  const int64_t B = h.size(0), E = h.size(2), KV = t[5].size(1), D = t[5].size(3);
  int64_t qkv_w = 0, o_w = 0, gu_w = 0;
  for (size_t i = 0; i < n; ++i) {
    qkv_w = std::max(qkv_w, t[12 * i + 1].size(0));
    o_w = std::max(o_w, t[12 * i + 3].size(1));
    gu_w = std::max(gu_w, t[12 * i + 8].size(0));
  }
  auto out = h.clone();  // the running h; the caller's tensor is left as it was
  auto ws = torch::empty({B * (E + qkv_w + qkv_w + o_w + E + gu_w + gu_w / 2)}, h.options());
  bf* x = ws.data_ptr<bf>();  // rmsnorm(h)
  bf* qkv = x + B * E;
  bf* qk = qkv + B * qkv_w;   // roped q and k heads
  bf* att = qk + B * qkv_w;   // attention out
  bf* y = att + B * o_w;      // o or down out
  bf* gu = y + B * E;
  bf* act = gu + B * gu_w;
  bf* hp = out.data_ptr<bf>();
  TORCH_CHECK(D % 16 == 0 && D <= 256 && cos.numel() == B * D / 2 && sin.numel() == B * D / 2);
  for (size_t i = 0; i < n; ++i) {
    const torch::Tensor* a = t.data() + 12 * i;
    const int64_t N = a[1].size(0) / D, H = N - 2 * KV;
    TORCH_CHECK(a[1].size(0) % D == 0 && H > 0 && H % KV == 0 && H / KV <= 16);
    TORCH_CHECK(a[5].size(1) == KV && a[5].size(3) == D && start < a[5].size(2));
    TORCH_CHECK(a[3].size(0) == E && a[3].size(1) == H * D && a[10].size(0) == E);
    TORCH_CHECK(a[8].size(0) == 2 * a[10].size(1));
    rmsnorm_rows(hp, a[0].data_ptr<bf>(), x, B, E, static_cast<float>(f[3 * i]));
    gemv_bf16_raw(x, B, E, a[1].data_ptr<bf>(), N * D, qkv);
    const int64_t xs[3] = {N * D, D, N * D};
    rope_rows(qkv, xs, cos.data_ptr<float>(), sin.data_ptr<float>(), qk, B, H + KV, 1, D);
    bf* kb = a[5].data_ptr<bf>();
    bf* vb = a[6].data_ptr<bf>();
    const int64_t ks[3] = {a[5].stride(0), a[5].stride(1), a[5].stride(2)};
    const int64_t vs[3] = {a[6].stride(0), a[6].stride(1), a[6].stride(2)};
    for (int64_t b = 0; b < B; ++b) {
      const int64_t p = write_pos(at, b, start);
      for (int64_t g = 0; g < KV; ++g) {
        std::memcpy(kb + b * ks[0] + g * ks[1] + p * ks[2], qk + (b * (H + KV) + H + g) * D, D * sizeof(bf));
        std::memcpy(vb + b * vs[0] + g * vs[1] + p * vs[2], qkv + b * N * D + (H + KV + g) * D, D * sizeof(bf));
      }
    }
    for (int64_t b = 1; b < B; ++b)  // q heads of row b to [b, H, D] (row 0's already are): attention's layout
      std::memmove(qk + b * H * D, qk + b * (H + KV) * D, H * D * sizeof(bf));
    const float scale = static_cast<float>(f[3 * i + 1]);
    one_query_attention<bf>(qk, kb, vb, allowed, att, B, H, KV, start + 1, D, ks, vs, scale);
    gemv_bf16_raw(att, B, H * D, a[3].data_ptr<bf>(), E, y);
    for (int64_t j = 0; j < B * E; ++j) hp[j] = bf(f32(hp[j]) + f32(y[j]));
    const int64_t F = a[10].size(1);
    rmsnorm_rows(hp, a[7].data_ptr<bf>(), x, B, E, static_cast<float>(f[3 * i + 2]));
    gemv_bf16_raw(x, B, E, a[8].data_ptr<bf>(), 2 * F, gu);
    silu_mul_rows(gu, act, B, F);
    gemv_bf16_raw(act, B, F, a[10].data_ptr<bf>(), E, y);
    for (int64_t j = 0; j < B * E; ++j) hp[j] = bf(f32(hp[j]) + f32(y[j]));
  }
  return out;
}

// A dense decoder stack's decode step in one call: each layer's attention half, then its MLP half, exactly as the
// two calls above (the same numbers), with no Python between layers. Per layer n: t[12n..] = ln1, wqkv, sqkv, wo,
// so, kbuf, vbuf, ln2, wgu, sgu, wd, sd; g[4n..] = gqkv, go, ggu, gd; f[3n..] = eps1, scale, eps2. Every layer
// writes this token at `start` of its cache buffers (or each row at write_at[b]). With plain bf16 weights it runs
// as `bf16_stack`.
torch::Tensor decode_dense_stack_impl(torch::Tensor h, std::vector<torch::Tensor> t, std::vector<int64_t> g,
                                 std::vector<double> f, torch::Tensor cos, torch::Tensor sin, int64_t start,
                                 torch::Tensor allowed, torch::Tensor write_at) {
  const size_t n = f.size() / 3;
  TORCH_CHECK(f.size() == 3 * n && t.size() == 12 * n && g.size() == 4 * n, "12 tensors, 4 ints, 3 floats a layer");
  const bool mask_ok = allowed.numel() == 0 || (allowed.is_contiguous() && allowed.numel() == h.size(0) * (start + 1));
  if (plain_bf16(h, t, n) && cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == torch::kFloat &&
      h.size(1) == 1 && mask_ok)
    return bf16_stack(h, t, f, n, cos, sin, start, allowed.numel() ? allowed.data_ptr<bool>() : nullptr,
                      rows_at(write_at, h.size(0), t[5].size(2)));
  for (size_t i = 0; i < n; ++i) {
    const torch::Tensor* a = t.data() + 12 * i;
    const int64_t* gi = g.data() + 4 * i;
    const double* fi = f.data() + 3 * i;
    h = decode_attention_block_impl(h, a[0], fi[0], a[1], a[2], gi[0], a[3], a[4], gi[1], cos, sin, a[5], a[6], start,
                               allowed, fi[1], write_at);
    h = decode_mlp_block_impl(h, a[7], fi[2], a[8], a[9], gi[2], a[10], a[11], gi[3]);
  }
  return h;
}

// ---- A MoE layer's decode half (spec §2) in one call: h + shared(x) + sum_k w_k expert_k(x), x = rmsnorm(h),
// the experts chosen by one group's fp32 router. The same ops in the same order as MoEBlock's eager path for
// few rows (router and the sorted-by-expert sum through ATen, each expert as ExpertGroup.expert /
// QuantExpertGroup.expert compute it), so the same numbers; only the experts a row picked are read.

// One expert on its rows: bf16 weights give gate|up in fp32 and the SwiGLU product rounded to bf16 once (the
// bf16 matvec's decode form); int4 tiles (s1 non-empty) run as matvec does.
static torch::Tensor expert_rows(torch::Tensor xs, const torch::Tensor& w1, const torch::Tensor& s1,
                                 const torch::Tensor& w2, const torch::Tensor& s2, int64_t group) {
  if (s1.defined()) return matvec(silu_mul(matvec(xs, w1, s1, group)), w2, s2, group);
  auto act = silu_mul(gemv_bf16_to<float>(xs.contiguous(), w1)).to(torch::kBFloat16);
  return gemv_bf16_to<at::BFloat16>(act, w2);
}

// h [B, 1, E]; router [X, E] fp32 and bias [X] (selection only); expert e is (w1[e], s1[e]) -> (w2[e], s2[e]) with
// s1, s2 empty lists for bf16 weights; the shared SwiGLU's linears as in matvec (sw1 empty: no shared experts).
torch::Tensor decode_moe_block_impl(torch::Tensor h, torch::Tensor ln, double eps, torch::Tensor router,
                               torch::Tensor bias, int64_t topk, double norm_min, std::vector<torch::Tensor> w1,
                               std::vector<torch::Tensor> s1, std::vector<torch::Tensor> w2,
                               std::vector<torch::Tensor> s2, int64_t group, torch::Tensor sw1, torch::Tensor ss1,
                               int64_t sg1, torch::Tensor sw2, torch::Tensor ss2, int64_t sg2) {
  const int64_t B = h.size(0), E = h.size(2), X = static_cast<int64_t>(w1.size());
  TORCH_CHECK(h.size(1) == 1 && router.size(0) == X && w2.size() == w1.size());
  TORCH_CHECK(s1.empty() ? s2.empty() : (s1.size() == w1.size() && s2.size() == w1.size()));
  auto x = rmsnorm(h, ln, eps).view({B, E});
  auto out = sw1.numel() ? matvec(silu_mul(matvec(x, sw1, ss1, sg1)), sw2, ss2, sg2) : torch::zeros_like(x);
  auto probs = at::linear(x.to(torch::kFloat), router).softmax(-1);
  auto ids = std::get<1>(at::topk(probs + bias, topk, -1));
  auto weights = probs.gather(-1, ids);
  weights = (weights / weights.sum(-1, true).clamp_min(norm_min)).to(x.scalar_type());
  auto flat = ids.reshape(-1);
  auto order = at::argsort(flat, true, 0, false);
  auto token = at::floor_divide(order, topk);
  auto xs = x.index_select(0, token);
  auto ys = torch::empty_like(xs);
  const auto counts = at::bincount(flat, {}, X);
  const int64_t* C = counts.data_ptr<int64_t>();
  const torch::Tensor none;  // bf16 experts: no scales
  for (int64_t e = 0, start = 0; e < X; start += C[e], ++e)
    if (C[e])
      ys.narrow(0, start, C[e]).copy_(expert_rows(xs.narrow(0, start, C[e]), w1[e], s1.empty() ? none : s1[e],
                                                  w2[e], s2.empty() ? none : s2[e], group));
  ys = ys * weights.reshape(-1).index_select(0, order).unsqueeze(1);
  return h + (out + torch::zeros_like(x).index_add_(0, token, ys)).view({B, 1, E});
}

// The entry points Python calls: the GIL is released while they run (they touch no Python object), so the
// server's event loop thread keeps answering while the engine thread computes a step, instead of waiting for
// the interpreter's switch interval after each call.
torch::Tensor decode_attention_block(torch::Tensor h, torch::Tensor ln, double eps, torch::Tensor wqkv,
                                     torch::Tensor sqkv, int64_t gqkv, torch::Tensor wo, torch::Tensor so,
                                     int64_t go, torch::Tensor cos, torch::Tensor sin, torch::Tensor kbuf,
                                     torch::Tensor vbuf, int64_t start, torch::Tensor allowed, double scale,
                                     torch::Tensor write_at) {
  pybind11::gil_scoped_release no_gil;
  return decode_attention_block_impl(h, ln, eps, wqkv, sqkv, gqkv, wo, so, go, cos, sin, kbuf, vbuf, start, allowed,
                                     scale, write_at);
}

torch::Tensor decode_mlp_block(torch::Tensor h, torch::Tensor ln, double eps, torch::Tensor wgu, torch::Tensor sgu,
                               int64_t ggu, torch::Tensor wd, torch::Tensor sd, int64_t gd) {
  pybind11::gil_scoped_release no_gil;
  return decode_mlp_block_impl(h, ln, eps, wgu, sgu, ggu, wd, sd, gd);
}

torch::Tensor decode_dense_stack(torch::Tensor h, std::vector<torch::Tensor> t, std::vector<int64_t> g,
                                 std::vector<double> f, torch::Tensor cos, torch::Tensor sin, int64_t start,
                                 torch::Tensor allowed, torch::Tensor write_at) {
  pybind11::gil_scoped_release no_gil;
  return decode_dense_stack_impl(h, t, g, f, cos, sin, start, allowed, write_at);
}

torch::Tensor decode_moe_block(torch::Tensor h, torch::Tensor ln, double eps, torch::Tensor router, torch::Tensor bias,
                               int64_t topk, double norm_min, std::vector<torch::Tensor> w1,
                               std::vector<torch::Tensor> s1, std::vector<torch::Tensor> w2,
                               std::vector<torch::Tensor> s2, int64_t group, torch::Tensor sw1, torch::Tensor ss1,
                               int64_t sg1, torch::Tensor sw2, torch::Tensor ss2, int64_t sg2) {
  pybind11::gil_scoped_release no_gil;
  return decode_moe_block_impl(h, ln, eps, router, bias, topk, norm_min, w1, s1, w2, s2, group, sw1, ss1, sg1, sw2,
                               ss2, sg2);
}
