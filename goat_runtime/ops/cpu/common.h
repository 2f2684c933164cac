// Shared by the CPU kernels (routed_lora.cpp, paged_attention.cpp): portable SIMD vectors,
// bfloat16 conversion, torch's OpenMP thread pool, and the functions module.cpp binds.
#pragma once

#include <torch/extension.h>

#include <c10/util/BFloat16.h>

#include <dlfcn.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>

namespace goat_cpu {

// ------------------------------------------------------------------------------------------
// SIMD vectors: GCC vector extensions, lowered to what -march offers (AVX2 here, AVX-512 or SSE
// elsewhere).

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
constexpr int kVecLen = kVecBytes / static_cast<int>(sizeof(float));
typedef float vfloat __attribute__((vector_size(kVecBytes)));

inline vfloat vload(const float* p) {  // unaligned load
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
// A vector-scalar operation broadcasts the scalar; f - (+0) is f exactly (a -0.0 stays -0.0),
// so this compiles to one vbroadcastss. (A loop setting each lane compiled under AVX-512 to 16
// masked moves per broadcast, 60 % of the expand's time.)
inline vfloat vsplat(float f) { return f - vfloat{}; }

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
// Threads. at::parallel_for is an inline template whose parallel branch is compiled only under
// -fopenmp (_OPENMP); in an extension built without it, it silently runs on one thread. Building
// this extension with -fopenmp is not wanted (it may pull in a second OpenMP runtime), so the
// kernel opens the parallel region through the GNU OpenMP entry point of the runtime torch has
// already loaded (libgomp.so.1, looked up with RTLD_NOLOAD: never loads one), which is exactly
// what `#pragma omp parallel` in at::parallel_for compiles to inside libtorch. Same pool, same
// thread count (torch.set_num_threads); without that runtime the kernel runs on one thread.

using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

inline GompParallel gomp_parallel() {
  static const GompParallel fn = []() -> GompParallel {
    void* lib = dlopen("libgomp.so.1", RTLD_LAZY | RTLD_NOLOAD);
    void* sym = lib != nullptr ? dlsym(lib, "GOMP_parallel") : nullptr;
    return reinterpret_cast<GompParallel>(sym);
  }();
  return fn;
}

// Runs body() on every thread of torch's intra-op pool (or once, inline, without one). body
// must not throw.
template <typename F>
void parallel_region(const F& body) {
  const GompParallel fn = gomp_parallel();
  if (fn == nullptr) {
    body();
    return;
  }
  auto trampoline = [](void* data) { (*static_cast<const F*>(data))(); };
  // num_threads 0: the runtime's current setting (torch passes none either, see #32008).
  fn(trampoline, const_cast<void*>(static_cast<const void*>(&body)), 0, 0);
}

// Runs fn(i) for every i in [0, n) on torch's intra-op pool, each thread pulling the next i
// from a shared counter (items of uneven size balance themselves). An exception thrown by fn
// (e.g. std::bad_alloc) stops the loop and is rethrown on the caller's thread.
template <typename F>
void parallel_for_dynamic(int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  std::atomic_flag failed = ATOMIC_FLAG_INIT;
  std::exception_ptr error;
  parallel_region([&]() {
    try {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
    } catch (...) {
      if (!failed.test_and_set()) error = std::current_exception();
      next.store(n);
    }
  });
  if (error) std::rethrow_exception(error);
}

// ------------------------------------------------------------------------------------------
// The kernels' bindings, called from module.cpp's PYBIND11_MODULE.

void register_routed_lora(pybind11::module_& m);
void register_paged_attention(pybind11::module_& m);

}  // namespace goat_cpu
