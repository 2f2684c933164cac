// Building blocks of the routed low-rank op's CPU kernel (routed_lora.cpp): register-tiled dot
// products, the top-k gate with torch.topk's tie order, the output accumulation with the
// reference's rounding, the expand's register tiles, and the software prefetch queue. Included
// by routed_lora.cpp only.
#pragma once

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace goat_cpu {
namespace routed {

// ------------------------------------------------------------------------------------------
// Dot products of one weight row with N token vectors. GCC vector extensions (portable: the
// compiler lowers them to whatever -march offers) with U independent accumulators per token, so
// the FMA latency is hidden and the weight row is loaded once for all N tokens.

template <int N, int U>
inline void dot_rows(const float* __restrict w, const float* const* xs, int64_t d,
                     float* __restrict out) {
  vfloat acc[N][U];
  for (int n = 0; n < N; ++n)
    for (int u = 0; u < U; ++u) acc[n][u] = vfloat{};
  const float* __restrict xr[N];
  for (int n = 0; n < N; ++n) xr[n] = xs[n];
  constexpr int64_t step = static_cast<int64_t>(U) * kVecLen;
  int64_t j = 0;
  for (; j + step <= d; j += step) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const vfloat wv = vload(w + j + u * kVecLen);
#pragma GCC unroll 8
      for (int n = 0; n < N; ++n) acc[n][u] += wv * vload(xr[n] + j + u * kVecLen);
    }
  }
  for (; j + kVecLen <= d; j += kVecLen) {
    const vfloat wv = vload(w + j);
    for (int n = 0; n < N; ++n) acc[n][0] += wv * vload(xr[n] + j);
  }
  for (int n = 0; n < N; ++n) {
    vfloat v = acc[n][0];
    for (int u = 1; u < U; ++u) v += acc[n][u];
    float sum = 0.f;
    for (int l = 0; l < kVecLen; ++l) sum += v[l];
    for (int64_t jj = j; jj < d; ++jj) sum += w[jj] * xr[n][jj];
    out[n] = sum;
  }
}

// out[i] = dot(w, xs[i]) for i < count.
inline void dot_many(const float* __restrict w, const float* const* xs, int count, int64_t d,
                     float* __restrict out) {
  int i = 0;
  for (; i + 4 <= count; i += 4) dot_rows<4, 2>(w, xs + i, d, out + i);
  switch (count - i) {
    case 3: dot_rows<3, 2>(w, xs + i, d, out + i); break;
    case 2: dot_rows<2, 4>(w, xs + i, d, out + i); break;
    case 1: dot_rows<1, 4>(w, xs + i, d, out + i); break;
    default: break;
  }
}

// out[r * stride + t] = dot(w[r], xs[t]) for RB rows and TB tokens: a register tile of RB x TB
// accumulators, so each weight load serves TB tokens and each input load RB rows.
template <int RB, int TB>
inline void dot_block(const float* const* w, const float* const* xs, int64_t d,
                      float* __restrict out, int64_t stride) {
  vfloat acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = vfloat{};
  const float* __restrict wr[RB];
  const float* __restrict xr[TB];
  for (int r = 0; r < RB; ++r) wr[r] = w[r];
  for (int t = 0; t < TB; ++t) xr[t] = xs[t];
  int64_t j = 0;
  for (; j + kVecLen <= d; j += kVecLen) {
    vfloat xv[TB];
#pragma GCC unroll 4
    for (int t = 0; t < TB; ++t) xv[t] = vload(xr[t] + j);
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const vfloat wv = vload(wr[r] + j);
#pragma GCC unroll 4
      for (int t = 0; t < TB; ++t) acc[r][t] += wv * xv[t];
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int t = 0; t < TB; ++t) {
      float sum = 0.f;
      for (int l = 0; l < kVecLen; ++l) sum += acc[r][t][l];
      for (int64_t jj = j; jj < d; ++jj) sum += wr[r][jj] * xr[t][jj];
      out[r * stride + t] = sum;
    }
  }
}

constexpr int kRowBlock = 3, kTokBlock = 3;

inline void dot_block_any(int rb, int tb, const float* const* w, const float* const* xs,
                          int64_t d, float* out, int64_t stride) {
  switch (rb * 4 + tb) {
    case 1 * 4 + 1: dot_block<1, 1>(w, xs, d, out, stride); break;
    case 1 * 4 + 2: dot_block<1, 2>(w, xs, d, out, stride); break;
    case 1 * 4 + 3: dot_block<1, 3>(w, xs, d, out, stride); break;
    case 2 * 4 + 1: dot_block<2, 1>(w, xs, d, out, stride); break;
    case 2 * 4 + 2: dot_block<2, 2>(w, xs, d, out, stride); break;
    case 2 * 4 + 3: dot_block<2, 3>(w, xs, d, out, stride); break;
    case 3 * 4 + 1: dot_block<3, 1>(w, xs, d, out, stride); break;
    case 3 * 4 + 2: dot_block<3, 2>(w, xs, d, out, stride); break;
    case 3 * 4 + 3: dot_block<3, 3>(w, xs, d, out, stride); break;
    default: break;
  }
}

// ------------------------------------------------------------------------------------------
// Top-k gate of one token and slice: softmax of the E logits, the top_k experts torch.topk
// keeps on the CPU, renormalised by their sum; unchosen experts get weight 0.
//
// Ties: torch.topk (ATen's topk_impl_loop) does not prefer the lower index. It puts the
// (probability, index) pairs through std::nth_element at k - 1 (std::partial_sort when
// 64 k <= E), comparing probabilities alone (NaN largest), then std::sort of the first k - 1,
// and keeps the first k. Which of several equal probabilities are kept is whatever libstdc++'s
// introselect leaves in front: a function of E, k and the pattern of equalities, e.g. experts
// {5, 6} of E = 8 equal ones for k = 2 (a zero-initialised router), {2, 3} of 4. So this calls
// the same std algorithms with the same comparator on the same pairs, and sums the kept
// probabilities in the order they come out, as the reference's top_w.sum() does.

using TopkPair = std::pair<float, int64_t>;

inline bool topk_before(const TopkPair& a, const TopkPair& b) {
  return (std::isnan(a.first) && !std::isnan(b.first)) || a.first > b.first;
}

inline void topk_gate(const float* logits, int E, int top_k, float* __restrict gate,
                      float* __restrict probs, TopkPair* __restrict queue) {
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
    queue[e] = {probs[e], e};
  }
  if (static_cast<int64_t>(top_k) * 64 <= E) {
    std::partial_sort(queue, queue + top_k, queue + E, topk_before);
  } else {
    std::nth_element(queue, queue + top_k - 1, queue + E, topk_before);
    std::sort(queue, queue + top_k - 1, topk_before);
  }
  float kept = 0.f;
  for (int j = 0; j < top_k; ++j) kept += queue[j].first;
  for (int j = 0; j < top_k; ++j) gate[queue[j].second] = queue[j].first / kept;
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

// Software prefetch queue. At decode every slot's rows come from memory once per call, so the
// kernel is bandwidth bound, and its reads are many short row runs (router rows, static rows,
// the chosen experts' rows, strided expand rows) that the hardware prefetchers pick up late.
// Regions are pushed in the order they will be read, and pump(lines) prefetches the next
// `lines` cache lines of the queue: pumping as many lines as each row read consumes keeps the
// prefetches a fixed distance (the initial pump) ahead of the reads.
struct Prefetcher {
  struct Region {
    const char* p;
    int64_t lines;
  };
  std::vector<Region> queue;
  size_t head = 0;

  void reset() {
    queue.clear();
    head = 0;
  }
  void push(const void* ptr, int64_t bytes) {
    if (bytes <= 0) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
    const uintptr_t start = a & ~static_cast<uintptr_t>(63);
    const int64_t lines = static_cast<int64_t>((a + bytes - start + 63) / 64);
    queue.push_back({reinterpret_cast<const char*>(start), lines});
  }
  void pump(int64_t lines) {
    while (lines > 0 && head < queue.size()) {
      Region& r = queue[head];
      const int64_t k = std::min(lines, r.lines);
      for (int64_t i = 0; i < k; ++i) __builtin_prefetch(r.p + i * 64, 0, 3);
      r.p += k * 64;
      r.lines -= k;
      lines -= k;
      if (r.lines == 0) ++head;
    }
  }
};

// Expand for a block of TB tokens of one slot: acc[t][0:V*kVecLen] = sum_r coef[t * ldc + r] *
// rows[r][j0 : j0 + V*kVecLen]. The TB x V accumulators stay in registers and each load of an
// expand row serves TB tokens (a token that does not use a row has coefficient 0 there).
template <int TB, int V>
inline void expand_block(const float* const* rows, const float* coef, int64_t ldc, int nrows,
                         int64_t j0, float* __restrict acc) {
  vfloat a[TB][V];
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < V; ++v) a[t][v] = vfloat{};
  for (int r = 0; r < nrows; ++r) {
    const float* __restrict e = rows[r] + j0;
    vfloat c[TB];
    for (int t = 0; t < TB; ++t) c[t] = vsplat(coef[t * ldc + r]);
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const vfloat ev = vload(e + v * kVecLen);
#pragma GCC unroll 4
      for (int t = 0; t < TB; ++t) a[t][v] += c[t] * ev;
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < V; ++v) vstore(acc + (t * V + v) * kVecLen, a[t][v]);
}

// y rows of a block of tb tokens += their expand over `width` columns, tile by tile.
template <int TB, typename act_t>
void expand_tokens(const float* const* rows, const float* coef, int64_t ldc, int nrows,
                   int64_t width, act_t* const* yrows, float* __restrict acc, Prefetcher* pf) {
  constexpr int V = TB == 1 ? 8 : TB == 2 ? 6 : 4;  // TB x V accumulators: 8..12 registers
  constexpr int64_t TW = V * kVecLen;
  int64_t j0 = 0;
  for (; j0 + TW <= width; j0 += TW) {
    if (pf != nullptr) pf->pump(nrows * (TW * static_cast<int64_t>(sizeof(float)) / 64));
    expand_block<TB, V>(rows, coef, ldc, nrows, j0, acc);
    for (int t = 0; t < TB; ++t) add_delta(yrows[t] + j0, acc + t * TW, TW);
  }
  if (j0 < width) {
    const int w = static_cast<int>(width - j0);
    for (int t = 0; t < TB; ++t) {
      float* __restrict a = acc + t * TW;
      for (int j = 0; j < w; ++j) a[j] = 0.f;
      for (int r = 0; r < nrows; ++r) {
        const float* __restrict e = rows[r] + j0;
        const float c = coef[t * ldc + r];
        for (int j = 0; j < w; ++j) a[j] += c * e[j];
      }
      add_delta(yrows[t] + j0, a, w);
    }
  }
}

}  // namespace routed
}  // namespace goat_cpu
