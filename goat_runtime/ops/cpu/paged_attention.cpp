// CPU kernel of decode attention over the paged KV cache (goat_runtime.ops.paged_decode_attention).
//
// out[s, h] = softmax(scale * q[s, h] . K[s, g]) V[s, g], g = h / (H / KVH), over the keys of
// sequence s's context (the last `sliding_window` of them when one is set), read where its
// block table says, straight from the cache.
//
// Why a kernel: the torch path gathers every sequence's K and V into a padded [S, KVH, L, D]
// copy, then runs SDPA with a mask; on the CPU the gather costs more than the attention itself
// and dominated the decode step after the linears. Here a work item is a sequence with all its
// KV heads (or, with few sequences, a single KV head): it reads each cached key and value row
// once, software-prefetched a few rows ahead, for the H / KVH query heads that share it (GQA),
// keeps the scores in a per-thread buffer (two passes: scores, then softmax-weighted values)
// and writes its heads' rows of out. Items are pulled dynamically by the threads of torch's
// pool (sequences differ in length). float32 math; bfloat16 tensors are converted row by row.

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace goat_cpu {
namespace {

// Below this many multiply-adds a call runs on the calling thread: waking the pool costs more.
constexpr int64_t kParallelMinWork = 1 << 15;

inline float dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  vfloat acc0 = vsplat(0.f), acc1 = vsplat(0.f);
  int64_t i = 0;
  for (; i + 2 * kVecLen <= d; i += 2 * kVecLen) {
    acc0 += vload(a + i) * vload(b + i);
    acc1 += vload(a + i + kVecLen) * vload(b + i + kVecLen);
  }
  for (; i + kVecLen <= d; i += kVecLen) acc0 += vload(a + i) * vload(b + i);
  acc0 += acc1;
  float sum = 0.f;
  for (int l = 0; l < kVecLen; ++l) sum += acc0[l];
  for (; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

// acc[0:d] += p * v[0:d]
inline void axpy(float p, const float* __restrict v, float* __restrict acc, int64_t d) {
  const vfloat pv = vsplat(p);
  int64_t i = 0;
  for (; i + kVecLen <= d; i += kVecLen) vstore(acc + i, vload(acc + i) + pv * vload(v + i));
  for (; i < d; ++i) acc[i] += p * v[i];
}

inline void from_float(const float* src, int64_t n, float* dst) {
  std::copy(src, src + n, dst);
}
inline void from_float(const float* src, int64_t n, c10::BFloat16* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}

struct Shape {
  int64_t num_seqs, num_heads, num_kv_heads, head_dim, num_blocks, block_size, table_width;
  float scale;
  int64_t sliding_window;  // 0: none
};

// Rows of the context read ahead of the one in use: each row is a short run of memory in a
// scattered block, which the hardware prefetchers pick up late.
constexpr int64_t kPrefetchRows = 4;

// Sequence s, KV heads [g0, g1) and their query heads: scores, softmax, weighted values.
template <typename scalar_t>
void attend_item(const Shape& p, int64_t s, int64_t g0, int64_t g1, const scalar_t* q,
                 const scalar_t* k_cache, const scalar_t* v_cache, const int32_t* block_tables,
                 const int64_t* context_lens, scalar_t* out) {
  const int64_t group = p.num_heads / p.num_kv_heads, d = p.head_dim;
  const int64_t heads = (g1 - g0) * group, h0 = g0 * group;
  const int64_t context = context_lens[s];
  const int64_t first = p.sliding_window > 0 ? std::max<int64_t>(0, context - p.sliding_window) : 0;
  const int64_t n = context - first;
  thread_local std::vector<float> buffer;
  // [heads, d] scaled queries, [heads, d] accumulators, [heads] 1 / softmax sums, [d] a
  // converted row, [heads, n] scores.
  buffer.resize(static_cast<size_t>(2 * heads * d + heads + d + heads * n));
  float* queries = buffer.data();
  float* acc = queries + heads * d;
  float* inv_sums = acc + heads * d;
  float* row_scratch = inv_sums + heads;
  float* scores = row_scratch + d;
  for (int64_t i = 0; i < heads; ++i) {
    const float* qi = row_as_float(q + (s * p.num_heads + h0 + i) * d, d, row_scratch);
    for (int64_t c = 0; c < d; ++c) queries[i * d + c] = qi[c] * p.scale;
  }
  const int32_t* table = block_tables + s * p.table_width;
  // The cached K or V of position j, KV heads g0.. (contiguous: [KVH, d] per position).
  auto cached_row = [&](const scalar_t* cache, int64_t j) {
    const int64_t block = table[j / p.block_size];
    TORCH_CHECK(block >= 0 && block < p.num_blocks, "paged_decode_attention: block id ", block,
                " of sequence ", s, " is outside the cache's ", p.num_blocks, " blocks");
    return cache + ((block * p.block_size + j % p.block_size) * p.num_kv_heads + g0) * d;
  };
  const int64_t row_bytes = (g1 - g0) * d * static_cast<int64_t>(sizeof(scalar_t));
  auto prefetch_row = [&](const scalar_t* cache, int64_t j) {
    if (j >= context) return;
    const char* row = reinterpret_cast<const char*>(cached_row(cache, j));
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
  };
  for (int64_t j = first; j < first + kPrefetchRows; ++j) prefetch_row(k_cache, j);
  for (int64_t j = first; j < context; ++j) {
    prefetch_row(k_cache, j + kPrefetchRows);
    const scalar_t* row = cached_row(k_cache, j);
    for (int64_t g = 0; g < g1 - g0; ++g) {
      const float* key = row_as_float(row + g * d, d, row_scratch);
      for (int64_t i = g * group; i < (g + 1) * group; ++i) {
        scores[i * n + (j - first)] = dot(queries + i * d, key, d);
      }
    }
  }
  for (int64_t j = first; j < first + kPrefetchRows; ++j) prefetch_row(v_cache, j);
  for (int64_t i = 0; i < heads; ++i) {
    float* row = scores + i * n;
    const float peak = *std::max_element(row, row + n);
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) sum += row[j] = std::exp(row[j] - peak);
    inv_sums[i] = 1.f / sum;
  }
  std::fill(acc, acc + heads * d, 0.f);
  for (int64_t j = first; j < context; ++j) {
    prefetch_row(v_cache, j + kPrefetchRows);
    const scalar_t* row = cached_row(v_cache, j);
    for (int64_t g = 0; g < g1 - g0; ++g) {
      const float* value = row_as_float(row + g * d, d, row_scratch);
      for (int64_t i = g * group; i < (g + 1) * group; ++i) {
        axpy(scores[i * n + (j - first)], value, acc + i * d, d);
      }
    }
  }
  for (int64_t i = 0; i < heads; ++i) {
    float* a = acc + i * d;
    for (int64_t c = 0; c < d; ++c) a[c] *= inv_sums[i];
    from_float(a, d, out + (s * p.num_heads + h0 + i) * d);
  }
}

template <typename scalar_t>
void run(const Shape& p, const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
         const at::Tensor& v_cache, const at::Tensor& block_tables,
         const at::Tensor& context_lens) {
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  int64_t work = 0;
  for (int64_t s = 0; s < p.num_seqs; ++s) work += lens[s];
  work *= 2 * p.num_heads * p.head_dim;
  const bool parallel = work >= kParallelMinWork;
  // One item per sequence reads its cached rows (all KV heads side by side) in one sweep; with
  // few sequences, one item per (sequence, KV head) keeps every thread busy.
  const int64_t threads = parallel ? at::get_num_threads() : 1;
  const int64_t heads_per_item = p.num_seqs >= 2 * threads ? p.num_kv_heads : 1;
  const int64_t items_per_seq = p.num_kv_heads / heads_per_item;
  auto item = [&](int64_t it) {
    const int64_t g0 = (it % items_per_seq) * heads_per_item;
    attend_item<scalar_t>(p, it / items_per_seq, g0, g0 + heads_per_item, qp, kp, vp, tables,
                          lens, op);
  };
  const int64_t num_items = p.num_seqs * items_per_seq;
  if (parallel) {
    parallel_for_dynamic(num_items, item);
  } else {
    for (int64_t it = 0; it < num_items; ++it) item(it);
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& context_lens, double scale,
                                  int64_t sliding_window) {
  const char* fn = "paged_decode_attention: ";
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k_cache, "k_cache"},
                                std::pair{&v_cache, "v_cache"}, std::pair{&block_tables,
                                "block_tables"}, std::pair{&context_lens, "context_lens"}}) {
    TORCH_CHECK(t->device().is_cpu(), fn, name, " must be a CPU tensor, got ", t->device());
    TORCH_CHECK(t->is_contiguous(), fn, name, " must be contiguous");
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, fn,
              "q must be float32 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type(),
              fn, "q, k_cache and v_cache must have one dtype");
  TORCH_CHECK(q.dim() == 3, fn, "q must be [num_seqs, num_heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), fn,
              "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2, fn,
              "block_tables must be [num_seqs, max_blocks] int32");
  TORCH_CHECK(context_lens.scalar_type() == at::kLong && context_lens.dim() == 1, fn,
              "context_lens must be [num_seqs] int64");
  Shape p{q.size(0), q.size(1), k_cache.size(2), q.size(2), k_cache.size(0), k_cache.size(1),
          block_tables.size(1), static_cast<float>(scale), sliding_window};
  TORCH_CHECK(k_cache.size(3) == p.head_dim, fn, "q's head_dim ", p.head_dim,
              " differs from the cache's ", k_cache.size(3));
  TORCH_CHECK(p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0, fn, "num_heads ",
              p.num_heads, " is not a multiple of num_kv_heads ", p.num_kv_heads);
  TORCH_CHECK(block_tables.size(0) == p.num_seqs && context_lens.size(0) == p.num_seqs, fn,
              "block_tables and context_lens need one row per sequence of q");
  TORCH_CHECK(sliding_window >= 0, fn, "sliding_window must be >= 0 (0: none)");
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < p.num_seqs; ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= p.table_width * p.block_size, fn, "context length ",
                lens[s], " of sequence ", s, " is not in [1, ", p.table_width * p.block_size,
                "] (block table width x block size)");
  }
  at::Tensor out = at::empty_like(q);
  {
    pybind11::gil_scoped_release no_gil;
    if (q.scalar_type() == at::kFloat) {
      run<float>(p, out, q, k_cache, v_cache, block_tables, context_lens);
    } else {
      run<c10::BFloat16>(p, out, q, k_cache, v_cache, block_tables, context_lens);
    }
  }
  return out;
}

}  // namespace

void register_paged_attention(pybind11::module_& m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "out[s, h] = softmax(scale q[s, h] K_s^T) V_s over sequence s's paged context (see "
        "goat_runtime.ops.paged_decode_attention)",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::arg("block_tables"), pybind11::arg("context_lens"), pybind11::arg("scale"),
        pybind11::arg("sliding_window") = 0);
}

}  // namespace goat_cpu
