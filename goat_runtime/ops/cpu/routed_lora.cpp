// CPU kernel of the routed low-rank op (goat_runtime.ops.add_routed_lora; GOAT_SPEC section 4).
//
// y[t] += X_a (gate(G_a x[t]) * h),  h = S_a x[t],  a = token_slots[t], per output slice.
//
// Layouts (see goat_runtime/ops/routed_lora.py): shrink [A, S, R, d_in] (value rows), router
// [A, S, E_max, d_in] float32 whatever the other weights' dtype (the logits are fp32 dot
// products of fp32 router rows with the fp32 (or widened bfloat16) x, as in the reference),
// expand [A, R, d_out] (slice s owns columns [off_s, off_{s+1})), slice_meta [A, S, 4] int32
// (E, top_k, expert_rank, rows): a slice reads only its first `rows` value rows (experts, then
// the static term); rows [rows, R) are another slot's size of padding and are never read.
//
// Strategy: tokens are grouped by slot (counting sort), and each group is cut into work items of
// at most kMaxTokensPerItem tokens. An item reads each weight row of its slot once and applies it
// to all its tokens, so the BGMV case (decode: one or two tokens per slot) and the SGMV case
// (prefill: long same-slot runs, a small GEMM) are the same code. Per item and slice:
//   1. a dense pass over the static rows and the router rows (needed by every token): RB x TB
//      register tiles of dot products;
//   2. the top-k gates (the experts torch.topk keeps, ties included: see topk_gate); the rows
//      of experts no token of the item chose are never read, the
//      chosen experts' rows are dotted only with the tokens that chose them;
//   3. the expand: y rows += coef-weighted expand rows over the slice's contiguous columns,
//      blocks of tokens sharing each load of an expand row, accumulators in registers.
// At decode the op is memory bound (each call reads every used slot's rows once), so reads are
// software-prefetched a fixed distance ahead (Prefetcher). Items are pulled dynamically by the
// threads of torch's intra-op OpenMP pool (see parallel_region: at::parallel_for itself is
// serial in an extension built without -fopenmp); small calls run inline on the caller's
// thread. Each token writes only its own row of y, so there are no races. Inner loops use GCC
// vector extensions (lowered to what -march offers: AVX2 here, AVX-512 or SSE elsewhere) with
// several independent accumulators; no -ffast-math. float32 is the fast path; bfloat16
// activations and/or weights are converted to float32 rows on the fly (fp32 math, like the
// reference, and for a bfloat16 y the fp32 update is rounded to bfloat16 before the add).
// Optionally, expert_counts[slot, e] counts the tokens whose router chose expert e (summed over
// slices): what the routers actually do, for the server's metrics.

#include "common.h"
#include "routed_lora_blocks.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <vector>

namespace goat_cpu {
namespace {

constexpr int kMaxTokensPerItem = 16;  // tokens of one slot processed together
constexpr int64_t kMetaFields = 4;      // slice_meta's last dimension
// Below this many multiply-adds a call runs on the calling thread: waking the pool costs more.
constexpr int64_t kParallelMinWork = 1 << 16;

using namespace routed;  // the building blocks (routed_lora_blocks.h)

struct Problem {
  int64_t num_tokens, d_in, d_out, num_slots, num_slices, value_rows, max_experts;
  const int32_t* meta;               // [A, S, 3]
  std::vector<int64_t> offsets;      // S + 1
  int64_t* expert_counts = nullptr;  // [A, counts_width] int64, or none: experts chosen
  int64_t counts_width = 0;
};

// Per-thread scratch, grown on demand and reused across calls.
struct Scratch {
  std::vector<float> xbuf, wrow, hdense, ebuf, logits, gates, probs, coef, acc, sel_out, ecoef;
  std::vector<const float*> xptr, sel_x, erows;
  std::vector<TopkPair> topk_queue;
  std::vector<int> sel_tok;
  std::vector<char> expert_used, row_used;
  Prefetcher prefetch;

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

constexpr int64_t kPrefetchLines = 96;  // prefetch distance, in 64-byte lines (6 KiB)
constexpr int kExpandTokens = 3;      // tokens expanded together (register tile, see below)

// Queue the rows of (slot, slice) read before its gates are known: the static rows (shrink
// rows [E * expert_rank, rows)) and the E router rows.
template <typename w_t>
void push_slice_start(Prefetcher& pf, const Problem& p, const w_t* shrink, const float* router,
                      int64_t slot, int64_t s) {
  const int32_t* m = p.meta + (slot * p.num_slices + s) * kMetaFields;
  const int64_t E = m[0], expert_rows = E > 0 ? E * m[2] : 0;
  const w_t* sh = shrink + (slot * p.num_slices + s) * p.value_rows * p.d_in;
  pf.push(sh + expert_rows * p.d_in,
          (m[3] - expert_rows) * p.d_in * static_cast<int64_t>(sizeof(w_t)));
  pf.push(router + (slot * p.num_slices + s) * p.max_experts * p.d_in,
          E * p.d_in * static_cast<int64_t>(sizeof(float)));
}

// One work item: `n` tokens (`toks`) all bound to `slot`; `next_slot` is the slot of the item
// this thread does next (-1: none), whose first rows are prefetched at the end of this one.
template <typename act_t, typename w_t>
void process_item(const Problem& p, const act_t* x, act_t* y, const w_t* shrink,
                  const float* router_w, const w_t* expand, int64_t slot, const int32_t* toks, int n,
                  int64_t next_slot) {
  Scratch& sc = thread_scratch();
  const int64_t d_in = p.d_in, d_out = p.d_out, R = p.value_rows;
  const int64_t emax = std::max<int64_t>(p.max_experts, 1);
  const int64_t row_lines = (d_in * static_cast<int64_t>(sizeof(w_t)) + 63) / 64;

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
                                           : Scratch::get(sc.wrow, kRowBlock * d_in);
  float* logits = Scratch::get(sc.logits, n * emax);
  float* gates = Scratch::get(sc.gates, n * emax);
  float* probs = Scratch::get(sc.probs, emax);
  TopkPair* topk_queue = Scratch::get(sc.topk_queue, emax);
  float* coef = Scratch::get(sc.coef, n * std::max<int64_t>(R, 1));  // [n][R]
  const float** sel_x = Scratch::get(sc.sel_x, n);
  int* sel_tok = Scratch::get(sc.sel_tok, n);
  float* sel_out = Scratch::get(sc.sel_out, n);
  float* acc = Scratch::get(sc.acc, 12 * kVecLen);
  char* expert_used = Scratch::get(sc.expert_used, emax);
  char* row_used = Scratch::get(sc.row_used, std::max<int64_t>(R, 1));
  Prefetcher& pf = sc.prefetch;
  pf.reset();
  push_slice_start(pf, p, shrink, router_w, slot, 0);
  pf.pump(kPrefetchLines);

  for (int64_t s = 0; s < p.num_slices; ++s) {
    const int32_t* m = p.meta + (slot * p.num_slices + s) * kMetaFields;
    const int E = m[0], top_k = m[1], er = E > 0 ? m[2] : 0;
    const int64_t expert_rows = static_cast<int64_t>(E) * er, used_rows = m[3];
    const w_t* sh = shrink + (slot * p.num_slices + s) * R * d_in;
    const float* gr = router_w + (slot * p.num_slices + s) * p.max_experts * d_in;
    const int64_t o0 = p.offsets[s], o1 = p.offsets[s + 1], width = o1 - o0;
    const w_t* ex = expand + slot * R * d_out + o0;

    // Dense pass, needed by every token whatever the routing: the static rows
    // [expert_rows, used_rows) of the shrink, then the E float32 router rows (never rounded to
    // the weights' dtype). Rows [used_rows, R) are padding: coefficient 0, never read.
    const int64_t static_rows = used_rows - expert_rows, dense_rows = static_rows + E;
    float* hd = Scratch::get(sc.hdense, std::max<int64_t>(dense_rows * n, 1));  // [row][n]
    {
      const w_t* rows = sh + expert_rows * d_in;
      const float* wb[kRowBlock];
      for (int64_t r0 = 0; r0 < dense_rows; r0 += kRowBlock) {
        const int rb = static_cast<int>(std::min<int64_t>(kRowBlock, dense_rows - r0));
        pf.pump(rb * row_lines);
        for (int r = 0; r < rb; ++r) {
          const int64_t row = r0 + r;
          wb[r] = row < static_rows
                      ? row_as_float(rows + row * d_in, d_in, wrow + (wrow ? r * d_in : 0))
                      : gr + (row - static_rows) * d_in;
        }
        for (int t0 = 0; t0 < n; t0 += kTokBlock) {
          const int tb = std::min(kTokBlock, n - t0);
          dot_block_any(rb, tb, wb, xp + t0, d_in, hd + r0 * n + t0, n);
        }
      }
    }
    for (int64_t c = expert_rows; c < R; ++c) {
      const float* h = c < used_rows ? hd + (c - expert_rows) * n : nullptr;
      for (int i = 0; i < n; ++i) coef[i * R + c] = h != nullptr ? h[i] : 0.f;
    }

    // Gates; which experts any token of the item chose.
    if (E > 0) {
      const float* router = hd + static_rows * n;  // [e][n]
      for (int i = 0; i < n; ++i) {
        for (int e = 0; e < E; ++e) logits[i * emax + e] = router[e * n + i];
        topk_gate(logits + i * emax, E, top_k, gates + i * emax, probs, topk_queue);
      }
      for (int e = 0; e < E; ++e) {
        int64_t chosen = 0;
        for (int i = 0; i < n; ++i) chosen += gates[i * emax + e] != 0.f;
        expert_used[e] = chosen > 0;
        if (chosen > 0 && p.expert_counts != nullptr && e < p.counts_width) {
          // Other threads may count the same slot's other tokens: relaxed atomics suffice.
          __atomic_fetch_add(p.expert_counts + slot * p.counts_width + e, chosen,
                             __ATOMIC_RELAXED);
        }
      }
    }
    for (int64_t c = 0; c < R; ++c) {
      row_used[c] = c < used_rows && (c >= expert_rows || expert_used[c / er]);
    }

    // Now the rest of this slice's reads are known: queue them, then the next slice's start.
    for (int e = 0; e < E; ++e) {
      if (expert_used[e]) pf.push(sh + e * er * d_in, er * d_in * sizeof(w_t));
    }
    if (width > 0) {
      for (int64_t c = 0; c < R; ++c) {
        if (row_used[c]) pf.push(ex + c * d_out, width * sizeof(w_t));
      }
    }
    if (s + 1 < p.num_slices) {
      push_slice_start(pf, p, shrink, router_w, slot, s + 1);
    } else if (next_slot >= 0) {
      push_slice_start(pf, p, shrink, router_w, next_slot, 0);
    }

    // The chosen experts' rows: h[c] only for the tokens that chose the expert; coef = gate * h.
    for (int64_t c = 0; c < expert_rows; ++c) {
      for (int i = 0; i < n; ++i) coef[i * R + c] = 0.f;
      if (!row_used[c]) continue;
      int cnt = 0;
      for (int i = 0; i < n; ++i) {
        if (gates[i * emax + c / er] != 0.f) {
          sel_tok[cnt] = i;
          sel_x[cnt] = xp[i];
          ++cnt;
        }
      }
      pf.pump(row_lines);
      const float* row = row_as_float(sh + c * d_in, d_in, wrow);
      dot_many(row, sel_x, cnt, d_in, sel_out);
      for (int j = 0; j < cnt; ++j) {
        const int i = sel_tok[j];
        coef[i * R + c] = gates[i * emax + c / er] * sel_out[j];
      }
    }

    // Expand: y[t, off_s:off_{s+1}] += sum_c coef[c] * expand[slot, c, off_s:off_{s+1}].
    if (width == 0) continue;
    // Rows as float: direct for float weights; for bfloat16 convert the rows any token needs.
    const float* ex_f = nullptr;
    int64_t ex_stride = d_out;
    if constexpr (std::is_same_v<w_t, float>) {
      ex_f = ex;
    } else {
      float* eb = Scratch::get(sc.ebuf, R * width);
      for (int64_t c = 0; c < R; ++c) {
        if (row_used[c]) to_float(ex + c * d_out, width, eb + c * width);
      }
      ex_f = eb;
      ex_stride = width;
    }
    // Blocks of up to kExpandTokens tokens: the union of the rows they use (coefficient 0 for a
    // token that does not use one), expanded together so each expand row load serves the block.
    const float** brows = Scratch::get(sc.erows, std::max<int64_t>(R, 1));
    float* bcoef = Scratch::get(sc.ecoef, kExpandTokens * std::max<int64_t>(R, 1));
    act_t* yrows[kExpandTokens];
    for (int b0 = 0; b0 < n; b0 += kExpandTokens) {
      const int tb = std::min(kExpandTokens, n - b0);
      int nr = 0;
      for (int64_t c = 0; c < used_rows; ++c) {
        bool used = false;
        for (int t = 0; t < tb; ++t) used |= coef[(b0 + t) * R + c] != 0.f;
        if (!used) continue;
        brows[nr] = ex_f + c * ex_stride;
        for (int t = 0; t < tb; ++t) bcoef[t * R + nr] = coef[(b0 + t) * R + c];
        ++nr;
      }
      if (nr == 0) continue;
      for (int t = 0; t < tb; ++t) yrows[t] = y + static_cast<int64_t>(toks[b0 + t]) * d_out + o0;
      // The first block reads the (float) rows from memory: keep the prefetches ahead of it.
      Prefetcher* bpf = b0 == 0 && std::is_same_v<w_t, float> ? &pf : nullptr;
      switch (tb) {
        case 1:
          expand_tokens<1>(brows, bcoef, R, nr, width, yrows, acc, bpf);
          break;
        case 2:
          expand_tokens<2>(brows, bcoef, R, nr, width, yrows, acc, bpf);
          break;
        default:
          expand_tokens<3>(brows, bcoef, R, nr, width, yrows, acc, bpf);
          break;
      }
    }
  }
}

template <typename act_t, typename w_t>
void run(const Problem& p, const at::Tensor& y, const at::Tensor& x, const at::Tensor& shrink,
         const at::Tensor& router, const at::Tensor& expand, const std::vector<int32_t>& order,
         const std::vector<int64_t>& item_start, const std::vector<int32_t>& item_len,
         const std::vector<int32_t>& item_slot, bool parallel) {
  const act_t* xp = x.data_ptr<act_t>();
  act_t* yp = y.data_ptr<act_t>();
  const w_t* sp = shrink.data_ptr<w_t>();
  const float* gp = router.data_ptr<float>();
  const w_t* ep = expand.data_ptr<w_t>();
  const int64_t num_items = static_cast<int64_t>(item_len.size());
  // Item `it`; `next` is the item likely done next (on this thread or another): its first rows
  // are prefetched at the end of this one.
  auto do_item = [&](int64_t it, int64_t next) {
    process_item<act_t, w_t>(p, xp, yp, sp, gp, ep, item_slot[it], order.data() + item_start[it],
                             item_len[it], next < num_items ? item_slot[next] : -1);
  };
  if (!parallel) {
    for (int64_t it = 0; it < num_items; ++it) do_item(it, it + 1);
    return;
  }
  // Dynamic scheduling: items differ in size (skewed popularity), so each pool thread pulls the
  // next item from a shared counter instead of taking a fixed range.
  std::atomic<int64_t> next{0};
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;
  parallel_region([&]() {
    try {
      // An item is claimed only when its thread is free: claiming the next one up front, to
      // prefetch it, left the other threads nothing when a call has as few items as threads
      // (a 32-token decode of one slot is 2 items, and ran on one thread). The first rows of the
      // item likely next are prefetched instead, whichever thread then takes it.
      for (int64_t it = next.fetch_add(1); it < num_items; it = next.fetch_add(1)) {
        do_item(it, next.load(std::memory_order_relaxed));
      }
    } catch (...) {  // e.g. std::bad_alloc growing the scratch: rethrown on the caller's thread
      if (!failed.test_and_set()) error = std::current_exception();
      next.store(num_items);
    }
  });
  if (error) std::rethrow_exception(error);
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
                     const at::Tensor& shrink, const at::Tensor& router,
                     const at::Tensor& expand, const at::Tensor& slice_meta, const std::vector<int64_t>& out_offsets,
                     const std::optional<at::Tensor>& expert_counts) {
  // ---- validation ----
  check_cpu_contiguous(y, "y");
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(token_slots, "token_slots");
  check_cpu_contiguous(shrink, "shrink");
  check_cpu_contiguous(router, "router");
  check_cpu_contiguous(expand, "expand");
  check_cpu_contiguous(slice_meta, "slice_meta");
  TORCH_CHECK(y.dim() == 2, "add_routed_lora: y must be [T, d_out], got ", y.dim(), " dims");
  TORCH_CHECK(x.dim() == 2, "add_routed_lora: x must be [T, d_in], got ", x.dim(), " dims");
  TORCH_CHECK(token_slots.dim() == 1, "add_routed_lora: token_slots must be [T], got ",
              token_slots.dim(), " dims");
  TORCH_CHECK(shrink.dim() == 4,
              "add_routed_lora: shrink must be [num_slots, num_slices, R, d_in], got ",
              shrink.dim(), " dims");
  TORCH_CHECK(router.dim() == 4,
              "add_routed_lora: router must be [num_slots, num_slices, E_max, d_in], got ",
              router.dim(), " dims");
  TORCH_CHECK(router.scalar_type() == at::kFloat, "add_routed_lora: router must be float32 "
              "(routers are never rounded to the served dtype), got ", dtype_name(router));
  TORCH_CHECK(expand.dim() == 3, "add_routed_lora: expand must be [num_slots, R, d_out], got ",
              expand.dim(), " dims");
  TORCH_CHECK(slice_meta.dim() == 3 && slice_meta.size(2) == kMetaFields,
              "add_routed_lora: slice_meta must be [num_slots, num_slices, 4], got ",
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
  p.value_rows = expand.size(1);
  p.max_experts = router.size(2);
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
  TORCH_CHECK(shrink.size(2) == p.value_rows, "add_routed_lora: shrink has ", shrink.size(2),
              " rows per slice but expand has ", p.value_rows, " value rows");
  TORCH_CHECK(router.size(0) == p.num_slots && router.size(1) == p.num_slices &&
                  router.size(3) == p.d_in,
              "add_routed_lora: router must be [num_slots = ", p.num_slots, ", num_slices = ",
              p.num_slices, ", E_max, d_in = ", p.d_in, "], got ", router.sizes());
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
  if (expert_counts.has_value()) {
    const at::Tensor& c = *expert_counts;
    check_cpu_contiguous(c, "expert_counts");
    TORCH_CHECK(c.scalar_type() == at::kLong && c.dim() == 2 && c.size(0) == p.num_slots,
                "add_routed_lora: expert_counts must be int64 [num_slots = ", p.num_slots,
                ", E], got ", dtype_name(c), " ", c.sizes());
    p.expert_counts = c.data_ptr<int64_t>();
    p.counts_width = c.size(1);
  }

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
      const int32_t* m = p.meta + (a * p.num_slices + s) * kMetaFields;
      const int32_t E = m[0], k = m[1], er = m[2], rows = m[3];
      TORCH_CHECK(E >= 0 && E <= p.max_experts, "add_routed_lora: slot ", a, " slice ", s,
                  " has ", E, " experts; router has room for ", p.max_experts, " rows");
      if (E > 0) {
        TORCH_CHECK(k >= 1 && k <= E, "add_routed_lora: slot ", a, " slice ", s, ": top_k = ",
                    k, " must be between 1 and num_experts = ", E);
        TORCH_CHECK(er >= 1 && static_cast<int64_t>(E) * er <= rows,
                    "add_routed_lora: slot ", a, " slice ", s, ": ", E, " experts of rank ", er,
                    " do not fit in its ", rows, " value rows");
      }
      TORCH_CHECK(rows >= 0 && rows <= p.value_rows, "add_routed_lora: slot ", a, " slice ", s,
                  " uses ", rows, " value rows; the slots hold ", p.value_rows);
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
  at::internal::lazy_init_num_threads();
  const int threads =
      at::in_parallel_region() || gomp_parallel() == nullptr ? 1 : at::get_num_threads();
  const int64_t work_per_token =
      p.num_slices * (p.value_rows + p.max_experts) * p.d_in + p.value_rows * p.d_out;
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
  auto go = [&](auto act, auto w) {  // run<activation type, weight type>
    run<decltype(act), decltype(w)>(p, y, x, shrink, router, expand, order, item_start,
                                    item_len, item_slot, par);
  };
  if (act_f32 && w_f32) {
    go(float{}, float{});
  } else if (act_f32) {
    go(float{}, c10::BFloat16{});
  } else if (w_f32) {
    go(c10::BFloat16{}, float{});
  } else {
    go(c10::BFloat16{}, c10::BFloat16{});
  }
}

}  // namespace

void register_routed_lora(pybind11::module_& m) {
  m.def("add_routed_lora", &add_routed_lora,
        "y[t] += X_a (gate(G_a x[t]) * S_a x[t]), a = token_slots[t], per output slice "
        "(in place; see goat_runtime.ops.routed_lora)",
        pybind11::arg("y"), pybind11::arg("x"), pybind11::arg("token_slots"),
        pybind11::arg("shrink"), pybind11::arg("router"), pybind11::arg("expand"), pybind11::arg("slice_meta"),
        pybind11::arg("out_offsets"), pybind11::arg("expert_counts") = pybind11::none(),
        // Arguments are converted with the GIL held; the kernel runs without it.
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace goat_cpu
