// CPU kernel of the routed low-rank op (goat_runtime.ops.add_routed_lora; GOAT_SPEC section 4).
//
// y[t] += X_a (gate(h) * h[:R]),  h = S_a x[t],  a = token_slots[t], per output slice.
//
// Layouts (see goat_runtime/ops/routed_lora.py): shrink [A, S, R + E_max, d_in] (value rows, then
// router rows), expand [A, R, d_out] (slice s owns columns [off_s, off_{s+1})), slice_meta
// [A, S, 3] int32 (E, top_k, expert_rank).
//
// Strategy: tokens are grouped by slot (counting sort), and each group is cut into work items of
// at most kMaxTokensPerItem tokens. An item reads each weight row of its slot once and applies it
// to all its tokens (the BGMV case, one token per item, and the SGMV case, long same-slot runs,
// are the same code). Items are pulled dynamically by torch's intra-op threads
// (at::parallel_for); small calls run inline on the caller's thread. Each token writes only its
// own row of y, so there are no races. Value rows whose gate is 0 (experts not chosen) are
// neither dotted nor expanded. The inner loops are plain loops over contiguous float arrays with
// several independent partial sums, so gcc -O3 -march=native vectorizes them (no -ffast-math
// needed). float32 is the fast path; bfloat16 activations and/or weights are converted to
// float32 rows on the fly (fp32 math, like the reference).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr int kMaxTokensPerItem = 16;  // tokens of one slot processed together
constexpr int kColTile = 64;           // output columns accumulated in registers per token
// Below this many multiply-adds a call runs on the calling thread: waking the pool costs more.
constexpr int64_t kParallelMinWork = 1 << 16;

// ------------------------------------------------------------------------------------------
// Element conversion.

inline float bf16_to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void to_float(const float* __restrict src, int64_t n, float* __restrict dst) {
  std::memcpy(dst, src, n * sizeof(float));
}

inline void to_float(const c10::BFloat16* __restrict src, int64_t n, float* __restrict dst) {
  const uint16_t* __restrict s = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    dst[i] = f;
  }
}

// A row of n elements as float32: the row itself for float, a converted copy in `scratch`
// otherwise.
inline const float* row_as_float(const float* src, int64_t /*n*/, float* /*scratch*/) {
  return src;
}
inline const float* row_as_float(const c10::BFloat16* src, int64_t n, float* scratch) {
  to_float(src, n, scratch);
  return scratch;
}

// ------------------------------------------------------------------------------------------
// Dot products of one weight row with N token vectors, L independent partial sums per token
// (enough accumulators to hide the FMA latency; the fixed inner loop vectorizes).

template <int N, int L>
inline void dot_rows(const float* __restrict w, const float* const* xs, int64_t d,
                     float* __restrict out) {
  float acc[N][L];
  for (int n = 0; n < N; ++n)
    for (int l = 0; l < L; ++l) acc[n][l] = 0.f;
  const float* __restrict xr[N];
  for (int n = 0; n < N; ++n) xr[n] = xs[n];
  int64_t j = 0;
  for (; j + L <= d; j += L) {
    for (int n = 0; n < N; ++n) {
      for (int l = 0; l < L; ++l) acc[n][l] += w[j + l] * xr[n][j + l];
    }
  }
  for (int n = 0; n < N; ++n) {
    float tail = 0.f;
    for (int64_t jj = j; jj < d; ++jj) tail += w[jj] * xr[n][jj];
    // Pairwise reduction of the partial sums.
    float tmp[L];
    for (int l = 0; l < L; ++l) tmp[l] = acc[n][l];
    for (int width = L / 2; width >= 1; width /= 2)
      for (int l = 0; l < width; ++l) tmp[l] += tmp[l + width];
    out[n] = tmp[0] + tail;
  }
}

// out[i] = dot(w, xs[i]) for i < count.
inline void dot_many(const float* __restrict w, const float* const* xs, int count, int64_t d,
                     float* __restrict out) {
  int i = 0;
  for (; i + 4 <= count; i += 4) dot_rows<4, 16>(w, xs + i, d, out + i);
  switch (count - i) {
    case 3: dot_rows<3, 16>(w, xs + i, d, out + i); break;
    case 2: dot_rows<2, 16>(w, xs + i, d, out + i); break;
    case 1: dot_rows<1, 32>(w, xs + i, d, out + i); break;
    default: break;
  }
}

// ------------------------------------------------------------------------------------------
// Top-k gate of one token and slice: softmax of the E logits, the top_k largest kept (ties:
// the lower index wins, as torch.topk), renormalised; unchosen experts get weight 0.

inline void topk_gate(const float* logits, int E, int top_k, float* __restrict gate,
                      float* __restrict probs) {
  float m = logits[0];
  for (int e = 1; e < E; ++e) m = std::max(m, logits[e]);
  float z = 0.f;
  for (int e = 0; e < E; ++e) {
    probs[e] = std::exp(logits[e] - m);
    z += probs[e];
  }
  const float inv_z = 1.f / z;
  for (int e = 0; e < E; ++e) {
    probs[e] *= inv_z;
    gate[e] = 0.f;
  }
  float kept = 0.f;
  for (int j = 0; j < top_k; ++j) {
    int best = -1;
    for (int e = 0; e < E; ++e) {
      if (gate[e] != 0.f) continue;  // already chosen (chosen weights are > 0 marks below)
      if (best < 0 || probs[e] > probs[best]) best = e;
    }
    if (best < 0) break;
    // Mark as chosen with a nonzero sentinel; the real weight is written below.
    gate[best] = -1.f;
    kept += probs[best];
  }
  const float inv_kept = 1.f / kept;
  for (int e = 0; e < E; ++e) gate[e] = gate[e] != 0.f ? probs[e] * inv_kept : 0.f;
}

// ------------------------------------------------------------------------------------------
// Output accumulation: y_row[j] += delta[j] with the reference's rounding (delta is computed in
// fp32 and, for bfloat16 y, rounded to bfloat16 before the add).

inline void add_delta(float* __restrict y, const float* __restrict delta, int w) {
  for (int j = 0; j < w; ++j) y[j] += delta[j];
}
inline void add_delta(c10::BFloat16* __restrict y, const float* __restrict delta, int w) {
  for (int j = 0; j < w; ++j) {
    const float d = static_cast<float>(static_cast<c10::BFloat16>(delta[j]));
    y[j] = static_cast<c10::BFloat16>(bf16_to_float(y[j]) + d);
  }
}

// acc[0:TW] = sum_r coef[r] * rows[r][0:TW]  (TW a compile-time tile width: stays in registers)
template <int TW>
inline void expand_tile(const float* const* rows, const float* coef, int nrows,
                        float* __restrict acc) {
  float a[TW];
  for (int j = 0; j < TW; ++j) a[j] = 0.f;
  for (int r = 0; r < nrows; ++r) {
    const float* __restrict e = rows[r];
    const float c = coef[r];
    for (int j = 0; j < TW; ++j) a[j] += c * e[j];
  }
  for (int j = 0; j < TW; ++j) acc[j] = a[j];
}

inline void expand_tail(const float* const* rows, const float* coef, int nrows, int w,
                        float* __restrict acc) {
  for (int j = 0; j < w; ++j) acc[j] = 0.f;
  for (int r = 0; r < nrows; ++r) {
    const float* __restrict e = rows[r];
    const float c = coef[r];
    for (int j = 0; j < w; ++j) acc[j] += c * e[j];
  }
}

// ------------------------------------------------------------------------------------------

struct Problem {
  int64_t num_tokens, d_in, d_out, num_slots, num_slices, shrink_rows, value_rows, max_experts;
  const int32_t* meta;               // [A, S, 3]
  std::vector<int64_t> offsets;      // S + 1
};

// Per-thread scratch, grown on demand and reused across calls.
struct Scratch {
  std::vector<float> xbuf, wrow, ebuf, logits, gates, probs, coef, acc;
  std::vector<const float*> xptr, sel_x, erows;
  std::vector<int> sel_tok;
  std::vector<float> sel_out, ecoef;

  template <typename V>
  static typename V::value_type* get(V& v, size_t n) {
    if (v.size() < n) v.resize(n);
    return v.data();
  }
};

Scratch& thread_scratch() {
  static thread_local Scratch s;
  return s;
}

// One work item: `n` tokens (`toks`) all bound to `slot`.
template <typename act_t, typename w_t>
void process_item(const Problem& p, const act_t* x, act_t* y, const w_t* shrink,
                  const w_t* expand, int64_t slot, const int32_t* toks, int n) {
  Scratch& sc = thread_scratch();
  const int64_t d_in = p.d_in, d_out = p.d_out, R = p.value_rows;
  const int64_t emax = std::max<int64_t>(p.max_experts, 1);

  // Token inputs as float rows.
  const float** xp = Scratch::get(sc.xptr, n);
  if constexpr (std::is_same_v<act_t, float>) {
    for (int i = 0; i < n; ++i) xp[i] = x + static_cast<int64_t>(toks[i]) * d_in;
  } else {
    float* xb = Scratch::get(sc.xbuf, static_cast<size_t>(n) * d_in);
    for (int i = 0; i < n; ++i) {
      to_float(x + static_cast<int64_t>(toks[i]) * d_in, d_in, xb + i * d_in);
      xp[i] = xb + i * d_in;
    }
  }
  float* wrow = std::is_same_v<w_t, float> ? nullptr
                                           : Scratch::get(sc.wrow, std::max(d_in, d_out));
  float* logits = Scratch::get(sc.logits, n * emax);
  float* gates = Scratch::get(sc.gates, n * emax);
  float* probs = Scratch::get(sc.probs, emax);
  float* coef = Scratch::get(sc.coef, n * std::max<int64_t>(R, 1));  // [n][R]
  const float** sel_x = Scratch::get(sc.sel_x, n);
  int* sel_tok = Scratch::get(sc.sel_tok, n);
  float* sel_out = Scratch::get(sc.sel_out, n);
  const float** erows = Scratch::get(sc.erows, std::max<int64_t>(R, 1));
  float* ecoef = Scratch::get(sc.ecoef, std::max<int64_t>(R, 1));
  float* acc = Scratch::get(sc.acc, kColTile);

  for (int64_t s = 0; s < p.num_slices; ++s) {
    const int32_t* m = p.meta + (slot * p.num_slices + s) * 3;
    const int E = m[0], top_k = m[1], er = E > 0 ? m[2] : 0;
    const int64_t expert_rows = static_cast<int64_t>(E) * er;
    const w_t* sh = shrink + (slot * p.num_slices + s) * p.shrink_rows * d_in;

    // Router logits and gates.
    if (E > 0) {
      for (int e = 0; e < E; ++e) {
        const float* g = row_as_float(sh + (R + e) * d_in, d_in, wrow);
        dot_many(g, xp, n, d_in, sel_out);
        for (int i = 0; i < n; ++i) logits[i * emax + e] = sel_out[i];
      }
      for (int i = 0; i < n; ++i) topk_gate(logits + i * emax, E, top_k, gates + i * emax, probs);
    }

    // Value rows: h[c] only for the tokens whose gate on row c is nonzero; coef = gate * h.
    for (int64_t c = 0; c < R; ++c) {
      int cnt = 0;
      for (int i = 0; i < n; ++i) {
        const float g = c < expert_rows ? gates[i * emax + c / er] : 1.f;
        coef[i * R + c] = g;
        if (g != 0.f) {
          sel_tok[cnt] = i;
          sel_x[cnt] = xp[i];
          ++cnt;
        }
      }
      if (cnt == 0) continue;
      const float* row = row_as_float(sh + c * d_in, d_in, wrow);
      dot_many(row, sel_x, cnt, d_in, sel_out);
      for (int j = 0; j < cnt; ++j) coef[sel_tok[j] * R + c] *= sel_out[j];
    }

    // Expand: y[t, off_s:off_{s+1}] += sum_c coef[c] * expand[slot, c, off_s:off_{s+1}].
    const int64_t o0 = p.offsets[s], o1 = p.offsets[s + 1], width = o1 - o0;
    if (width == 0) continue;
    const w_t* ex = expand + slot * R * d_out + o0;
    // Rows as float: direct for float weights; for bfloat16 convert the rows any token needs.
    const float* ex_f = nullptr;
    int64_t ex_stride = d_out;
    if constexpr (std::is_same_v<w_t, float>) {
      ex_f = ex;
    } else {
      float* eb = Scratch::get(sc.ebuf, R * width);
      for (int64_t c = 0; c < R; ++c) {
        bool needed = false;
        for (int i = 0; i < n && !needed; ++i) needed = coef[i * R + c] != 0.f;
        if (needed) to_float(ex + c * d_out, width, eb + c * width);
      }
      ex_f = eb;
      ex_stride = width;
    }
    for (int i = 0; i < n; ++i) {
      int nr = 0;
      for (int64_t c = 0; c < R; ++c) {
        const float cf = coef[i * R + c];
        if (cf != 0.f) {
          erows[nr] = ex_f + c * ex_stride;
          ecoef[nr] = cf;
          ++nr;
        }
      }
      if (nr == 0) continue;
      act_t* yr = y + static_cast<int64_t>(toks[i]) * d_out + o0;
      int64_t j0 = 0;
      for (; j0 + kColTile <= width; j0 += kColTile) {
        expand_tile<kColTile>(erows, ecoef, nr, acc);
        add_delta(yr + j0, acc, kColTile);
        for (int r = 0; r < nr; ++r) erows[r] += kColTile;
      }
      if (j0 < width) {
        const int w = static_cast<int>(width - j0);
        expand_tail(erows, ecoef, nr, w, acc);
        add_delta(yr + j0, acc, w);
      }
    }
  }
}

template <typename act_t, typename w_t>
void run(const Problem& p, const at::Tensor& y, const at::Tensor& x, const at::Tensor& shrink,
         const at::Tensor& expand, const std::vector<int32_t>& order,
         const std::vector<int64_t>& item_start, const std::vector<int32_t>& item_len,
         const std::vector<int32_t>& item_slot, bool parallel) {
  const act_t* xp = x.data_ptr<act_t>();
  act_t* yp = y.data_ptr<act_t>();
  const w_t* sp = shrink.data_ptr<w_t>();
  const w_t* ep = expand.data_ptr<w_t>();
  const int64_t num_items = static_cast<int64_t>(item_len.size());
  auto do_item = [&](int64_t it) {
    process_item<act_t, w_t>(p, xp, yp, sp, ep, item_slot[it], order.data() + item_start[it],
                             item_len[it]);
  };
  if (!parallel) {
    for (int64_t it = 0; it < num_items; ++it) do_item(it);
    return;
  }
  // Dynamic scheduling: items differ in size (skewed popularity), so each pool thread pulls the
  // next item from a shared counter instead of taking a fixed range.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_items);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t it = next.fetch_add(1); it < num_items; it = next.fetch_add(1)) do_item(it);
    }
  });
}

std::string dtype_name(const at::Tensor& t) { return std::string(c10::toString(t.scalar_type())); }

void check_float_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "add_routed_lora: ", name, " must be float32 or bfloat16, got ", dtype_name(t));
}

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "add_routed_lora: ", name,
              " must be a CPU tensor (this is the CPU kernel), got device ", t.device());
  TORCH_CHECK(t.is_contiguous(), "add_routed_lora: ", name, " must be contiguous");
}

void add_routed_lora(at::Tensor y, const at::Tensor& x, const at::Tensor& token_slots,
                     const at::Tensor& shrink, const at::Tensor& expand,
                     const at::Tensor& slice_meta, const std::vector<int64_t>& out_offsets) {
  // ---- validation ----
  check_cpu_contiguous(y, "y");
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(token_slots, "token_slots");
  check_cpu_contiguous(shrink, "shrink");
  check_cpu_contiguous(expand, "expand");
  check_cpu_contiguous(slice_meta, "slice_meta");
  TORCH_CHECK(y.dim() == 2, "add_routed_lora: y must be [T, d_out], got ", y.dim(), " dims");
  TORCH_CHECK(x.dim() == 2, "add_routed_lora: x must be [T, d_in], got ", x.dim(), " dims");
  TORCH_CHECK(token_slots.dim() == 1, "add_routed_lora: token_slots must be [T], got ",
              token_slots.dim(), " dims");
  TORCH_CHECK(shrink.dim() == 4,
              "add_routed_lora: shrink must be [num_slots, num_slices, R + E_max, d_in], got ",
              shrink.dim(), " dims");
  TORCH_CHECK(expand.dim() == 3, "add_routed_lora: expand must be [num_slots, R, d_out], got ",
              expand.dim(), " dims");
  TORCH_CHECK(slice_meta.dim() == 3 && slice_meta.size(2) == 3,
              "add_routed_lora: slice_meta must be [num_slots, num_slices, 3], got ",
              slice_meta.sizes());
  check_float_dtype(y, "y");
  check_float_dtype(shrink, "shrink");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "add_routed_lora: x and y must have the same "
              "dtype, got x ", dtype_name(x), " and y ", dtype_name(y));
  TORCH_CHECK(expand.scalar_type() == shrink.scalar_type(), "add_routed_lora: shrink and expand "
              "must have the same dtype, got shrink ", dtype_name(shrink), " and expand ",
              dtype_name(expand));
  TORCH_CHECK(token_slots.scalar_type() == at::kInt, "add_routed_lora: token_slots must be "
              "int32, got ", dtype_name(token_slots));
  TORCH_CHECK(slice_meta.scalar_type() == at::kInt, "add_routed_lora: slice_meta must be int32, "
              "got ", dtype_name(slice_meta));

  Problem p;
  p.num_tokens = x.size(0);
  p.d_in = x.size(1);
  p.d_out = y.size(1);
  p.num_slots = shrink.size(0);
  p.num_slices = shrink.size(1);
  p.shrink_rows = shrink.size(2);
  p.value_rows = expand.size(1);
  p.max_experts = p.shrink_rows - p.value_rows;
  TORCH_CHECK(y.size(0) == p.num_tokens && token_slots.size(0) == p.num_tokens,
              "add_routed_lora: y, x and token_slots must have the same number of tokens, got ",
              y.size(0), ", ", p.num_tokens, " and ", token_slots.size(0));
  TORCH_CHECK(shrink.size(3) == p.d_in, "add_routed_lora: d_in mismatch: x has ", p.d_in,
              " columns but shrink rows have ", shrink.size(3));
  TORCH_CHECK(expand.size(2) == p.d_out, "add_routed_lora: d_out mismatch: y has ", p.d_out,
              " columns but expand has ", expand.size(2));
  TORCH_CHECK(expand.size(0) == p.num_slots && slice_meta.size(0) == p.num_slots,
              "add_routed_lora: shrink, expand and slice_meta must have the same number of "
              "slots, got ", p.num_slots, ", ", expand.size(0), " and ", slice_meta.size(0));
  TORCH_CHECK(slice_meta.size(1) == p.num_slices, "add_routed_lora: slice_meta has ",
              slice_meta.size(1), " slices but shrink has ", p.num_slices);
  TORCH_CHECK(p.max_experts >= 0, "add_routed_lora: shrink has ", p.shrink_rows,
              " rows per slice, fewer than expand's ", p.value_rows, " value rows");
  TORCH_CHECK(static_cast<int64_t>(out_offsets.size()) == p.num_slices + 1,
              "add_routed_lora: out_offsets must have num_slices + 1 = ", p.num_slices + 1,
              " entries, got ", out_offsets.size());
  TORCH_CHECK(out_offsets.front() == 0 && out_offsets.back() == p.d_out,
              "add_routed_lora: out_offsets must start at 0 and end at d_out = ", p.d_out,
              ", got ", out_offsets);
  for (size_t i = 1; i < out_offsets.size(); ++i) {
    TORCH_CHECK(out_offsets[i] >= out_offsets[i - 1],
                "add_routed_lora: out_offsets must be non-decreasing, got ", out_offsets);
  }
  p.offsets = out_offsets;
  p.meta = slice_meta.data_ptr<int32_t>();

  const int64_t T = p.num_tokens;
  if (T == 0) return;

  // ---- group tokens by slot (stable counting sort), checking slot indices ----
  const int32_t* slots = token_slots.data_ptr<int32_t>();
  std::vector<int32_t> count(p.num_slots + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    const int32_t a = slots[t];
    TORCH_CHECK(a >= -1 && a < p.num_slots, "add_routed_lora: token ", t, " has slot ", a,
                ", outside [-1, ", p.num_slots, ")");
    if (a >= 0) ++count[a + 1];
  }
  int64_t used_tokens = 0;
  for (int64_t a = 0; a < p.num_slots; ++a) {
    const int32_t c = count[a + 1];
    if (c == 0) continue;
    used_tokens += c;
    for (int64_t s = 0; s < p.num_slices; ++s) {
      const int32_t* m = p.meta + (a * p.num_slices + s) * 3;
      const int32_t E = m[0], k = m[1], er = m[2];
      TORCH_CHECK(E >= 0 && E <= p.max_experts, "add_routed_lora: slot ", a, " slice ", s,
                  " has ", E, " experts; shrink has room for ", p.max_experts, " router rows");
      if (E > 0) {
        TORCH_CHECK(k >= 1 && k <= E, "add_routed_lora: slot ", a, " slice ", s, ": top_k = ",
                    k, " must be between 1 and num_experts = ", E);
        TORCH_CHECK(er >= 1 && static_cast<int64_t>(E) * er <= p.value_rows,
                    "add_routed_lora: slot ", a, " slice ", s, ": ", E, " experts of rank ", er,
                    " do not fit in the ", p.value_rows, " value rows");
      }
    }
  }
  if (used_tokens == 0) return;
  for (int64_t a = 0; a < p.num_slots; ++a) count[a + 1] += count[a];
  std::vector<int32_t> order(used_tokens);
  {
    std::vector<int32_t> pos(count.begin(), count.end() - 1);
    for (int64_t t = 0; t < T; ++t) {
      if (slots[t] >= 0) order[pos[slots[t]]++] = static_cast<int32_t>(t);
    }
  }

  // ---- work items: each slot's tokens cut into chunks ----
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t work_per_token = p.num_slices * p.shrink_rows * p.d_in + p.value_rows * p.d_out;
  const bool parallel = threads > 1 && used_tokens > 1 &&
                        used_tokens * work_per_token >= kParallelMinWork;
  // Chunks small enough that every thread gets work, at most kMaxTokensPerItem.
  int64_t chunk = kMaxTokensPerItem;
  if (parallel) {
    chunk = std::clamp<int64_t>((used_tokens + threads - 1) / threads, 1, kMaxTokensPerItem);
  }
  std::vector<int64_t> item_start;
  std::vector<int32_t> item_len, item_slot;
  for (int64_t a = 0; a < p.num_slots; ++a) {
    for (int64_t b = count[a]; b < count[a + 1]; b += chunk) {
      item_start.push_back(b);
      item_len.push_back(static_cast<int32_t>(std::min<int64_t>(chunk, count[a + 1] - b)));
      item_slot.push_back(static_cast<int32_t>(a));
    }
  }
  const bool par = parallel && item_len.size() > 1;

  const bool act_f32 = y.scalar_type() == at::kFloat;
  const bool w_f32 = shrink.scalar_type() == at::kFloat;
  if (act_f32 && w_f32) {
    run<float, float>(p, y, x, shrink, expand, order, item_start, item_len, item_slot, par);
  } else if (act_f32) {
    run<float, c10::BFloat16>(p, y, x, shrink, expand, order, item_start, item_len, item_slot,
                              par);
  } else if (w_f32) {
    run<c10::BFloat16, float>(p, y, x, shrink, expand, order, item_start, item_len, item_slot,
                              par);
  } else {
    run<c10::BFloat16, c10::BFloat16>(p, y, x, shrink, expand, order, item_start, item_len,
                                      item_slot, par);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernel of the routed low-rank op (GOAT LoRA mixture-of-experts adapters)";
  m.def("add_routed_lora", &add_routed_lora,
        "y[t] += X_a (gate(h) * h[:R]), h = S_a x[t], a = token_slots[t], per output slice "
        "(in place; see goat_runtime.ops.routed_lora)",
        pybind11::arg("y"), pybind11::arg("x"), pybind11::arg("token_slots"),
        pybind11::arg("shrink"), pybind11::arg("expand"), pybind11::arg("slice_meta"),
        pybind11::arg("out_offsets"));
}
