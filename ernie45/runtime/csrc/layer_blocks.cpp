// A decoder layer's decode step as two calls (compiled after matvec.cpp and fused_ops.cpp, in one unit).

// ---- A decoder layer's decode step in two calls: the attention half and the dense MLP half, each from its
// RMSNorm through its residual add, composed of the ops above in the eager code's order and roundings (so the
// same numbers). One call instead of ~20 torch ops and ~6 module calls from Python per half.

// A linear as the decode calls read it: bf16 (or fp32) weights w [N, K] with `scales` empty, int8 codes w [N, K]
// with one scale per row, or int4 tiles w with their (scale, zero) pairs `scales` in groups of `group` columns.
struct Linear {
  torch::Tensor w, scales;
  int64_t group;
};

// The weights arrive as three flat lists (tensors, ints, floats: what an op schema can carry), written by Python's
// `kernels.pack` in the order of the structs' fields; `Packed` reads them back in that order, so each struct below
// is the one place its layout is stated.
struct Packed {
  at::TensorList t;
  at::IntArrayRef g;
  at::ArrayRef<double> f;
  size_t ti = 0, gi = 0, fi = 0;
  torch::Tensor tensor() { TORCH_CHECK(ti < t.size(), "packed weights: too few tensors"); return t[ti++]; }
  int64_t integer() { TORCH_CHECK(gi < g.size(), "packed weights: too few ints"); return g[gi++]; }
  double real() { TORCH_CHECK(fi < f.size(), "packed weights: too few floats"); return f[fi++]; }
  Linear linear() {
    Linear l;
    l.w = tensor();
    l.scales = tensor();
    l.group = integer();
    return l;
  }
  bool more() const { return ti < t.size(); }
  void done() const {
    TORCH_CHECK(ti == t.size() && gi == g.size() && fi == f.size(), "packed weights: more values than the layout");
  }
};

// An attention half: input RMSNorm, the fused q|k|v projection, the output projection, the softmax scale.
struct AttentionWeights {
  torch::Tensor norm;
  double eps;
  Linear qkv, o;
  double scale;
  static AttentionWeights read(Packed& p) {
    AttentionWeights a;
    a.norm = p.tensor();
    a.eps = p.real();
    a.qkv = p.linear();
    a.o = p.linear();
    a.scale = p.real();
    return a;
  }
};

// A dense MLP half: post-attention RMSNorm, the fused gate|up projection, the down projection.
struct MlpWeights {
  torch::Tensor norm;
  double eps;
  Linear gate_up, down;
  static MlpWeights read(Packed& p) {
    MlpWeights m;
    m.norm = p.tensor();
    m.eps = p.real();
    m.gate_up = p.linear();
    m.down = p.linear();
    return m;
  }
};

// A MoE half's own weights (the routed experts come as lists beside it): the norm, the fp32 router and its
// selection bias, top-k and the weights' normaliser floor, the shared SwiGLU (gate_up.w empty: none), and the
// routed experts' int4 group size.
struct MoeWeights {
  torch::Tensor norm;
  double eps;
  torch::Tensor router, bias;
  int64_t top_k;
  double norm_min;
  Linear shared_gate_up, shared_down;
  int64_t expert_group;
  static MoeWeights read(Packed& p) {
    MoeWeights m;
    m.norm = p.tensor();
    m.eps = p.real();
    m.router = p.tensor();
    m.bias = p.tensor();
    m.top_k = p.integer();
    m.norm_min = p.real();
    m.shared_gate_up = p.linear();
    m.shared_down = p.linear();
    m.expert_group = p.integer();
    return m;
  }
};

// What every layer of one decode step shares: RoPE's cos, sin [B, 1, D/2] fp32, the position it writes (`start`,
// or each row at write_at[b] when non-empty), which positions 0..start each row may attend (`allowed` [B, start+1]
// bool, or empty: all).
struct Step {
  torch::Tensor cos, sin;
  int64_t start;
  torch::Tensor allowed, write_at;
};

// x2 [M, K] @ W^T in x2's dtype: the int8 kernel for int8 codes, the int4 kernel for int4 tiles, the bf16 matvec
// for bf16, torch's linear otherwise.
static torch::Tensor matvec(torch::Tensor x2, const Linear& l) {
  if (l.w.scalar_type() == torch::kChar)
    return gemv_int8(x2.to(torch::kFloat).contiguous(), l.w, l.scales).to(x2.scalar_type());
  if (l.scales.numel())
    return gemv_int4(x2.to(torch::kFloat).contiguous(), l.w, l.scales, l.group).to(x2.scalar_type());
  if (x2.scalar_type() == torch::kBFloat16 && l.w.scalar_type() == torch::kBFloat16 && x2.size(1) % 32 == 0)
    return gemv_bf16_to<at::BFloat16>(x2.contiguous(), l.w);
  return at::linear(x2, l.w);
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

template <class T> static T* rows_of(std::vector<float>& buf, int64_t n) {  // n values of T in a float buffer
  buf.resize((n * sizeof(T) + sizeof(float) - 1) / sizeof(float));
  return reinterpret_cast<T*>(buf.data());
}

static bool int4_tiles(const Linear& l) { return l.w.scalar_type() != torch::kChar && l.scales.numel() > 0; }
static int64_t out_width(const Linear& l) {  // int4 tiles carry N in their (scale, zero) pairs [K/G, N, 2]
  return int4_tiles(l) ? l.scales.size(1) : l.w.size(0);
}
static int64_t in_width(const Linear& l) { return int4_tiles(l) ? l.w.numel() * 2 / out_width(l) : l.w.size(1); }

// y [M, N] = x [M, K] @ W^T, both T, as `matvec` computes it: the quantized kernels on x in fp32 rounded back to T,
// the bf16 matvec for bf16, torch's linear otherwise.
template <class T>
static void matvec_rows(const T* x, int64_t M, int64_t K, const Linear& l, T* y) {
  static thread_local std::vector<float> fx, fy;
  const int64_t N = out_width(l);
  const bool int8 = l.w.scalar_type() == torch::kChar, quant = int8 || l.scales.numel();
  TORCH_CHECK(M <= 8 || (quant && !int8), "the int8 and bf16 matvecs take at most 8 rows");  // (as their tensor forms)
  if (quant) {
    const float* xf = reinterpret_cast<const float*>(x);
    if (!std::is_same<T, float>::value) {
      fx.resize(M * K);
      for (int64_t i = 0; i < M * K; ++i) fx[i] = f32(x[i]);
      xf = fx.data();
    }
    float* yf = std::is_same<T, float>::value ? reinterpret_cast<float*>(y) : (fy.resize(M * N), fy.data());
    TORCH_CHECK(!int8 || l.scales.scalar_type() == torch::kFloat || l.scales.scalar_type() == torch::kBFloat16,
                "int8 codes need fp32 or bf16 scales");
    if (int8)
      gemv_int8_raw(xf, M, K, l.w.data_ptr<int8_t>(), l.scales.scalar_type() == torch::kFloat ? l.scales.data_ptr<float>()
                    : nullptr, l.scales.scalar_type() == torch::kBFloat16
                    ? reinterpret_cast<const uint16_t*>(l.scales.data_ptr<at::BFloat16>()) : nullptr, N, yf);
    else
      gemv_int4_raw(xf, M, K, l.w.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(l.scales.data_ptr<at::BFloat16>()),
                    N, l.group, yf);
    if (!std::is_same<T, float>::value)
      for (int64_t i = 0; i < M * N; ++i) y[i] = T(yf[i]);
    return;
  }
  if constexpr (std::is_same<T, at::BFloat16>::value) {
    if (l.w.scalar_type() == torch::kBFloat16 && K % 32 == 0) return gemv_bf16_raw(x, M, K, l.w.template data_ptr<T>(), N, y);
  }
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  auto xt = torch::from_blob(const_cast<T*>(x), {M, K}, torch::TensorOptions().dtype(dtype));
  torch::from_blob(y, {M, N}, torch::TensorOptions().dtype(dtype)).copy_(at::linear(xt, l.w));
}

// h [B, 1, E] -> h + o(attention(rope(qkv(rmsnorm(h))))), writing this position's K and V into the cache buffers
// kbuf, vbuf [B, KV, max_len, D] where `step` says and attending over positions 0..start.
static torch::Tensor attention_half(torch::Tensor h, const AttentionWeights& a, const torch::Tensor& kbuf,
                                    const torch::Tensor& vbuf, const Step& s) {
  const int64_t B = h.size(0), E = h.size(2), KV = kbuf.size(1), D = kbuf.size(3);
  auto qkv = matvec(rmsnorm(h, a.norm, a.eps).view({B, E}), a.qkv);
  TORCH_CHECK(h.size(1) == 1 && s.start < kbuf.size(2) && qkv.size(1) % D == 0);
  const int64_t N = qkv.size(1) / D, H = N - 2 * KV;
  auto heads = qkv.view({B, 1, N, D}).transpose(1, 2);
  auto qk = rope(heads.narrow(1, 0, H + KV), s.cos, s.sin);
  const int64_t* at = rows_at(s.write_at, B, kbuf.size(2));
  if (at == nullptr) {
    kbuf.narrow(2, s.start, 1).copy_(qk.narrow(1, H, KV));
    vbuf.narrow(2, s.start, 1).copy_(heads.narrow(1, H + KV, KV));
  } else {
    for (int64_t b = 0; b < B; ++b) {
      kbuf.select(0, b).narrow(1, at[b], 1).copy_(qk.select(0, b).narrow(0, H, KV));
      vbuf.select(0, b).narrow(1, at[b], 1).copy_(heads.select(0, b).narrow(0, H + KV, KV));
    }
  }
  auto out = decode_attention(qk.narrow(1, 0, H).contiguous(), kbuf.narrow(2, 0, s.start + 1),
                              vbuf.narrow(2, 0, s.start + 1), s.allowed, a.scale);
  return h + matvec(out.view({B, H * D}), a.o).view({B, 1, E});
}

// h [B, 1, E] -> h + down(silu(gate) * up) of rmsnorm(h), gate|up one matrix.
static torch::Tensor mlp_half(torch::Tensor h, const MlpWeights& m) {
  const int64_t B = h.size(0), E = h.size(2);
  auto act = silu_mul(matvec(rmsnorm(h, m.norm, m.eps).view({B, E}), m.gate_up));
  return h + matvec(act, m.down).view({B, 1, E});
}

struct DenseLayer {
  AttentionWeights attention;
  MlpWeights mlp;
  torch::Tensor kbuf, vbuf;
};

// ---- The halves on raw pointers (bf16 activations): the same kernels in the same order and with the same
// roundings as the tensor code above (so the same numbers), but no ATen op between them. Inside a step every ATen op
// (a view, a narrow, an empty, a dtype conversion) ran on code and data the streamed weights had pushed out of the
// caches, ~30 such ops a layer. `ws` is scratch of `attention_scratch` / `mlp_scratch` values.
using bf = at::BFloat16;

static int64_t attention_scratch(const AttentionWeights& a, int64_t B, int64_t E) {
  return B * (E + 2 * out_width(a.qkv) + in_width(a.o) + E);
}
static int64_t mlp_scratch(const MlpWeights& m, int64_t B, int64_t E) {
  return B * (E + out_width(m.gate_up) + out_width(m.gate_up) / 2 + E);
}

// hp [B, E] += o(attention(rope(qkv(rmsnorm(hp))))), K and V written into the cache buffers as `attention_half`.
static void attention_rows(bf* hp, const AttentionWeights& a, const torch::Tensor& kbuf, const torch::Tensor& vbuf,
                           const Step& s, const bool* allowed, const int64_t* at, int64_t B, int64_t E, bf* ws) {
  const int64_t KV = kbuf.size(1), D = kbuf.size(3), start = s.start, NW = out_width(a.qkv);
  const int64_t N = NW / D, H = N - 2 * KV;
  TORCH_CHECK(NW % D == 0 && H > 0 && H % KV == 0 && H / KV <= 16 && start < kbuf.size(2));
  TORCH_CHECK(out_width(a.o) == E && in_width(a.o) == H * D && in_width(a.qkv) == E);
  bf* x = ws;           // rmsnorm(h)
  bf* qkv = x + B * E;
  bf* qk = qkv + B * NW;  // roped q and k heads
  bf* att = qk + B * NW;  // attention out
  bf* y = att + B * H * D;
  rmsnorm_rows(hp, a.norm.data_ptr<bf>(), x, B, E, static_cast<float>(a.eps));
  matvec_rows(x, B, E, a.qkv, qkv);
  const int64_t xs[3] = {N * D, D, N * D};
  rope_rows(qkv, xs, s.cos.data_ptr<float>(), s.sin.data_ptr<float>(), qk, B, H + KV, 1, D);
  bf* kb = kbuf.data_ptr<bf>();
  bf* vb = vbuf.data_ptr<bf>();
  const int64_t ks[3] = {kbuf.stride(0), kbuf.stride(1), kbuf.stride(2)};
  const int64_t vs[3] = {vbuf.stride(0), vbuf.stride(1), vbuf.stride(2)};
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = write_pos(at, b, start);
    for (int64_t g = 0; g < KV; ++g) {
      std::memcpy(kb + b * ks[0] + g * ks[1] + p * ks[2], qk + (b * (H + KV) + H + g) * D, D * sizeof(bf));
      std::memcpy(vb + b * vs[0] + g * vs[1] + p * vs[2], qkv + b * N * D + (H + KV + g) * D, D * sizeof(bf));
    }
  }
  for (int64_t b = 1; b < B; ++b)  // q heads of row b to [b, H, D] (row 0's already are): attention's layout
    std::memmove(qk + b * H * D, qk + b * (H + KV) * D, H * D * sizeof(bf));
  one_query_attention<bf>(qk, kb, vb, allowed, att, B, H, KV, start + 1, D, ks, vs, static_cast<float>(a.scale));
  matvec_rows(att, B, H * D, a.o, y);
  for (int64_t j = 0; j < B * E; ++j) hp[j] = bf(f32(hp[j]) + f32(y[j]));
}

// hp [B, E] += down(silu(gate) * up) of rmsnorm(hp), as `mlp_half`.
static void mlp_rows(bf* hp, const MlpWeights& m, int64_t B, int64_t E, bf* ws) {
  const int64_t F = out_width(m.gate_up) / 2;
  TORCH_CHECK(in_width(m.gate_up) == E && out_width(m.down) == E && in_width(m.down) == F);
  bf* x = ws;
  bf* gu = x + B * E;
  bf* act = gu + B * 2 * F;
  bf* y = act + B * F;
  rmsnorm_rows(hp, m.norm.data_ptr<bf>(), x, B, E, static_cast<float>(m.eps));
  matvec_rows(x, B, E, m.gate_up, gu);
  silu_mul_rows(gu, act, B, F);
  matvec_rows(act, B, F, m.down, y);
  for (int64_t j = 0; j < B * E; ++j) hp[j] = bf(f32(hp[j]) + f32(y[j]));
}

// Whether these halves can run on raw pointers: bf16 activations (at most 8 rows of one position), contiguous bf16
// norms, weights the decode kernels take as they are (bf16 with input widths of whole 32-column blocks, int8 codes
// of whole 64-column blocks, int4 tiles), bf16 cache buffers whose last dim is contiguous, a RoPE table and mask
// as the step ops read them.
static bool raw_ready(const torch::Tensor& h, const Step& s, const AttentionWeights* a, const MlpWeights* m,
                      const torch::Tensor* kbuf, const torch::Tensor* vbuf) {
  auto bf16 = [](const torch::Tensor& x) { return x.scalar_type() == torch::kBFloat16 && x.is_contiguous(); };
  auto takes = [&](const Linear& l) {
    if (!l.w.is_contiguous()) return false;
    if (l.w.scalar_type() == torch::kChar) return l.w.size(1) % 64 == 0 && l.scales.is_contiguous();
    if (int4_tiles(l)) return l.scales.scalar_type() == torch::kBFloat16 && l.scales.is_contiguous();
    return l.w.scalar_type() == torch::kBFloat16 && l.w.size(1) % 32 == 0;
  };
  auto cache = [](const torch::Tensor& c) { return c.scalar_type() == torch::kBFloat16 && c.stride(3) == 1; };
  if (!bf16(h) || h.size(1) != 1 || h.size(0) > 8 || h.size(2) % 32) return false;
  if (a) {
    const int64_t B = h.size(0);
    const bool mask_ok = s.allowed.numel() == 0 || (s.allowed.is_contiguous() && s.allowed.numel() == B * (s.start + 1));
    if (!mask_ok || !s.cos.is_contiguous() || !s.sin.is_contiguous() || s.cos.scalar_type() != torch::kFloat) return false;
    if (!bf16(a->norm) || !takes(a->qkv) || !takes(a->o) || !cache(*kbuf) || !cache(*vbuf)) return false;
    if (kbuf->size(3) % 16 || kbuf->size(3) > 256 || s.cos.numel() != B * kbuf->size(3) / 2) return false;
  }
  return !m || (bf16(m->norm) && takes(m->gate_up) && takes(m->down));
}

static const bool* allowed_of(const Step& s) { return s.allowed.numel() ? s.allowed.data_ptr<bool>() : nullptr; }

static bf* scratch_of(int64_t n) {  // the raw halves' scratch, kept from step to step
  static thread_local std::vector<float> buf;
  return rows_of<bf>(buf, n);
}

// A dense stack on raw pointers: each layer's attention rows, then its MLP rows.
static torch::Tensor raw_stack(torch::Tensor h, const std::vector<DenseLayer>& layers, const Step& s) {
  const int64_t B = h.size(0), E = h.size(2);
  int64_t scratch = 0;
  for (const auto& l : layers)
    scratch = std::max({scratch, attention_scratch(l.attention, B, E), mlp_scratch(l.mlp, B, E)});
  bf* ws = scratch_of(scratch);
  auto out = h.clone();  // the running h; the caller's tensor is left as it was
  const int64_t* at = rows_at(s.write_at, B, layers[0].kbuf.size(2));
  for (const auto& l : layers) {
    attention_rows(out.data_ptr<bf>(), l.attention, l.kbuf, l.vbuf, s, allowed_of(s), at, B, E, ws);
    mlp_rows(out.data_ptr<bf>(), l.mlp, B, E, ws);
  }
  return out;
}

// One layer's halves as the layer calls run them: on raw pointers where `raw_ready`, else on tensors.
static torch::Tensor attention_step(torch::Tensor h, const AttentionWeights& a, const torch::Tensor& kbuf,
                                    const torch::Tensor& vbuf, const Step& s) {
  if (!raw_ready(h, s, &a, nullptr, &kbuf, &vbuf)) return attention_half(h, a, kbuf, vbuf, s);
  const int64_t B = h.size(0), E = h.size(2);
  bf* ws = scratch_of(attention_scratch(a, B, E));
  auto out = h.clone();
  attention_rows(out.data_ptr<bf>(), a, kbuf, vbuf, s, allowed_of(s), rows_at(s.write_at, B, kbuf.size(2)), B, E, ws);
  return out;
}

static torch::Tensor mlp_step(torch::Tensor h, const MlpWeights& m) {
  if (!raw_ready(h, Step{}, nullptr, &m, nullptr, nullptr)) return mlp_half(h, m);
  const int64_t B = h.size(0), E = h.size(2);
  bf* ws = scratch_of(mlp_scratch(m, B, E));
  auto out = h.clone();
  mlp_rows(out.data_ptr<bf>(), m, B, E, ws);
  return out;
}

// A dense decoder stack's decode step in one call: each layer's attention half, then its MLP half, exactly as the
// two halves above (the same numbers), with no Python between layers. Per layer: AttentionWeights then MlpWeights
// packed one after the other; caches = k0, v0, k1, v1, ... With bf16 activations it runs as `raw_stack`.
static torch::Tensor dense_stack(torch::Tensor h, Packed p, at::TensorList caches, const Step& s) {
  std::vector<DenseLayer> layers;
  while (p.more()) {
    DenseLayer l;
    l.attention = AttentionWeights::read(p);
    l.mlp = MlpWeights::read(p);
    TORCH_CHECK(caches.size() >= 2 * layers.size() + 2, "dense_stack: a K and a V buffer per layer");
    l.kbuf = caches[2 * layers.size()];
    l.vbuf = caches[2 * layers.size() + 1];
    layers.push_back(l);
  }
  p.done();
  TORCH_CHECK(!layers.empty() && caches.size() == 2 * layers.size(), "dense_stack: a K and a V buffer per layer");
  bool raw = true;
  for (const auto& l : layers) raw = raw && raw_ready(h, s, &l.attention, &l.mlp, &l.kbuf, &l.vbuf);
  if (raw) return raw_stack(h, layers, s);
  for (const auto& l : layers) {
    h = attention_step(h, l.attention, l.kbuf, l.vbuf, s);
    h = mlp_step(h, l.mlp);
  }
  return h;
}

// ---- A MoE layer's decode half (docs/architecture.md, "Mixture of experts") in one call: h + shared(x) +
// sum_k w_k expert_k(x), x = rmsnorm(h), the experts chosen by one group's fp32 router. The same ops in the same
// order as the eager MoE block for few rows (router and the sorted-by-expert sum through ATen, each expert as the
// expert groups compute it), so the same numbers; only the experts a row picked are read.

// One expert on its rows: bf16 weights give gate|up in fp32 and the SwiGLU product rounded to bf16 once (the
// bf16 matvec's decode form); int4 tiles (s1 defined) and fp32 weights run as matvec does.
static torch::Tensor expert_rows(torch::Tensor xs, const torch::Tensor& w1, const torch::Tensor& s1,
                                 const torch::Tensor& w2, const torch::Tensor& s2, int64_t group) {
  if (s1.defined() || w1.scalar_type() == torch::kFloat)
    return matvec(silu_mul(matvec(xs, {w1, s1, group})), {w2, s2, group});
  auto act = silu_mul(gemv_bf16_to<float>(xs.contiguous(), w1)).to(torch::kBFloat16);
  return gemv_bf16_to<at::BFloat16>(act, w2);
}

// ---- Decode rows (B <= 8: a step of one request, or a verify's tokens) on raw pointers: the tensor route's ops on
// per-thread buffers, in the same order and roundings, with only the router's linear, softmax and top-k left to
// ATen (~10 ops where the tensor route makes ~100: its argsort, index_select, index_add and each expert's
// conversions, each ~10 us on caches the streamed expert weights have just flushed). Each expert any row picked
// runs once over the rows that picked it, in expert order, as the tensor route sorts them.

// A SwiGLU on M rows: down(silu(gate) * up) with the fused gate|up linear, as `matvec` + `silu_mul` compute it.
template <class T>
static void swiglu_rows(const T* x, int64_t M, int64_t K, const Linear& gate_up, const Linear& down, T* y) {
  static thread_local std::vector<float> gu, act;
  const int64_t F = out_width(gate_up) / 2;
  T* g = rows_of<T>(gu, M * 2 * F);
  T* a = rows_of<T>(act, M * F);
  matvec_rows(x, M, K, gate_up, g);
  silu_mul_rows(g, a, M, F);
  matvec_rows(a, M, F, down, y);
}

template <class T>
static torch::Tensor moe_rows(torch::Tensor h, const MoeWeights& m, at::TensorList w1, at::TensorList s1,
                              at::TensorList w2, at::TensorList s2, bool stacked) {
  static thread_local std::vector<float> xb, sb, rb, yb, gb, ab, accb;
  const int64_t B = h.size(0), E = h.size(2), k = m.top_k;
  const T* hp = h.template data_ptr<T>();
  T* x = rows_of<T>(xb, B * E);
  rmsnorm_rows(hp, m.norm.template data_ptr<T>(), x, B, E, static_cast<float>(m.eps));
  T* shared = rows_of<T>(sb, B * E);
  const bool has_shared = m.shared_gate_up.w.numel() > 0;
  if (has_shared) swiglu_rows(x, B, E, m.shared_gate_up, m.shared_down, shared);
  const torch::Tensor xt = torch::from_blob(x, {B, E}, h.options());
  const torch::Tensor probs = at::linear(xt.to(torch::kFloat), m.router).softmax(-1);
  const torch::Tensor ids = std::get<1>(at::topk(probs + m.bias, k, -1)).contiguous();
  torch::Tensor weights = probs.gather(-1, ids);
  weights = (weights / weights.sum(-1, true).clamp_min(m.norm_min)).to(h.scalar_type()).contiguous();
  std::vector<std::tuple<int64_t, int64_t, T>> picked(B * k);  // (expert, row, weight), by expert then row
  for (int64_t j = 0; j < B * k; ++j) picked[j] = {ids.data_ptr<int64_t>()[j], j / k, weights.data_ptr<T>()[j]};
  std::stable_sort(picked.begin(), picked.end(),
                   [](const auto& a, const auto& b) { return std::get<0>(a) < std::get<0>(b); });
  T* xs = rows_of<T>(rb, B * E);  // the rows an expert takes, gathered
  T* y = rows_of<T>(yb, B * E);
  T* acc = rows_of<T>(accb, B * E);
  for (int64_t j = 0; j < B * E; ++j) acc[j] = T(0.f);
  const torch::Tensor none;
  for (size_t first = 0; first < picked.size();) {
    const int64_t e = std::get<0>(picked[first]);
    size_t end = first;
    while (end < picked.size() && std::get<0>(picked[end]) == e) ++end;
    const int64_t n = static_cast<int64_t>(end - first);
    for (int64_t r = 0; r < n; ++r) std::memcpy(xs + r * E, x + std::get<1>(picked[first + r]) * E, E * sizeof(T));
    const torch::Tensor g1 = stacked ? w1[0].select(0, e) : w1[e];
    const torch::Tensor g2 = stacked ? w2[0].select(0, e) : w2[e];
    if (s1.empty() && std::is_same<T, at::BFloat16>::value) {  // bf16 experts: gate|up in fp32, the product once to bf16
      const int64_t F = g1.size(0) / 2;
      TORCH_CHECK(E % 32 == 0 && F % 32 == 0, "bf16 experts: the matvec reads widths of whole 32-column blocks");
      gb.resize(n * 2 * F);
      ab.resize(n * F);
      using bf = at::BFloat16;
      gemv_bf16_raw(reinterpret_cast<const bf*>(xs), n, E, g1.data_ptr<bf>(), 2 * F, gb.data());
      silu_mul_rows(gb.data(), ab.data(), n, F);
      bf* a = rows_of<bf>(gb, n * F);  // (gate|up is spent)
      for (int64_t i = 0; i < n * F; ++i) a[i] = bf(ab[i]);
      gemv_bf16_raw(a, n, F, g2.data_ptr<bf>(), E, reinterpret_cast<bf*>(y));
    } else {
      swiglu_rows(xs, n, E, Linear{g1, s1.empty() ? none : s1[e], m.expert_group},
                  Linear{g2, s2.empty() ? none : s2[e], m.expert_group}, y);
    }
    for (int64_t r = 0; r < n; ++r) {
      const int64_t row = std::get<1>(picked[first + r]);
      const float wf = f32(std::get<2>(picked[first + r]));
      T* out = acc + row * E;
      for (int64_t j = 0; j < E; ++j) out[j] = T(f32(out[j]) + f32(T(f32(y[r * E + j]) * wf)));
    }
    first = end;
  }
  auto out = torch::empty_like(h);
  T* op = out.template data_ptr<T>();
  for (int64_t j = 0; j < B * E; ++j)
    op[j] = T(f32(hp[j]) + f32(T((has_shared ? f32(shared[j]) : 0.f) + f32(acc[j]))));
  return out;
}

// h [B, 1, E]; expert e is (w1[e], s1[e]) -> (w2[e], s2[e]), s1 and s2 empty lists for bf16 weights. bf16
// experts may instead come stacked: w1 = [gate_up [X, 2I, E]], w2 = [down [X, E, I]] (one list element each, so
// the call does not convert 2 x 64 list elements every layer and step).
static torch::Tensor moe_half(torch::Tensor h, const MoeWeights& m, at::TensorList w1, at::TensorList s1,
                              at::TensorList w2, at::TensorList s2) {
  const bool stacked = w1.size() == 1 && w1[0].dim() == 3;
  const int64_t B = h.size(0), E = h.size(2), X = stacked ? w1[0].size(0) : static_cast<int64_t>(w1.size());
  TORCH_CHECK(h.size(1) == 1 && m.router.size(0) == X && w2.size() == w1.size());
  TORCH_CHECK(stacked ? (s1.empty() && s2.empty() && w2[0].dim() == 3 && w2[0].size(0) == X && w1[0].is_contiguous()
                         && w2[0].is_contiguous())
                      : (s1.empty() ? s2.empty() : (s1.size() == w1.size() && s2.size() == w1.size())));
  if (B <= 8 && h.is_contiguous() && m.norm.scalar_type() == h.scalar_type() &&
      (h.scalar_type() == torch::kBFloat16 || h.scalar_type() == torch::kFloat))
    return h.scalar_type() == torch::kBFloat16 ? moe_rows<at::BFloat16>(h, m, w1, s1, w2, s2, stacked)
                                               : moe_rows<float>(h, m, w1, s1, w2, s2, stacked);
  auto x = rmsnorm(h, m.norm, m.eps).view({B, E});
  auto out = m.shared_gate_up.w.numel() ? matvec(silu_mul(matvec(x, m.shared_gate_up)), m.shared_down)
                                        : torch::zeros_like(x);
  auto probs = at::linear(x.to(torch::kFloat), m.router).softmax(-1);
  auto ids = std::get<1>(at::topk(probs + m.bias, m.top_k, -1));
  torch::Tensor weights = probs.gather(-1, ids);
  weights = (weights / weights.sum(-1, true).clamp_min(m.norm_min)).to(x.scalar_type());
  auto flat = ids.reshape(-1);
  auto order = at::argsort(flat, true, 0, false);
  auto token = at::floor_divide(order, m.top_k);
  auto xs = x.index_select(0, token);
  auto ys = torch::empty_like(xs);
  const auto counts = at::bincount(flat, {}, X);
  const int64_t* C = counts.data_ptr<int64_t>();
  const torch::Tensor none;  // bf16 experts: no scales
  for (int64_t e = 0, start = 0; e < X; start += C[e], ++e)
    if (C[e])
      ys.narrow(0, start, C[e]).copy_(expert_rows(xs.narrow(0, start, C[e]), stacked ? w1[0].select(0, e) : w1[e],
                                                  s1.empty() ? none : s1[e], stacked ? w2[0].select(0, e) : w2[e],
                                                  s2.empty() ? none : s2[e], m.expert_group));
  ys = ys * weights.reshape(-1).index_select(0, order).unsqueeze(1);
  return h + (out + torch::zeros_like(x).index_add_(0, token, ys)).view({B, 1, E});
}
