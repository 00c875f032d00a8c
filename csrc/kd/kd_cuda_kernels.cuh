// Device code of the fused KD-loss kernels (no torch headers: compiled standalone by
// csrc/tests/kd_cuda_kernels_check.cu and tests/test_cuda_build.py, included by kd_cuda.cu and
// nld_cuda.cu for the extension). Same algorithms and outputs as the CPU kernels (kd_cpu.cpp,
// nld_cpu.cpp), shaped for the GPU like the Triton ones (snnkd_fast/kd/triton.py, nld_triton.py):
//
// * Row kernels (the forward passes, the HTA teacher head and the NLD backward's row sums): one
//   block of kThreads per row, a thread strides over the classes (coalesced along C when the
//   class stride is 1), keeps online statistics (running max, rescaled sums) in registers, and
//   the block merges them with one cub::BlockReduce per pass.
// * Element kernels (the backward passes): one thread per (b, c), looping over t; the gradient
//   needs only the saved per-row statistics, so there is no reduction at all, and a [B, C]
//   teacher's gradient is summed over t in a register of its owning thread (deterministic, no
//   atomics, no [T, B, C] buffer).
//
// Inputs are read in place through their strides (student [T, B, C], teacher [Tt, B, C] with a t
// stride of 0 for a [B, C] teacher). Element types s_t / u_t are float, double or a 16-bit float
// type (c10::Half / c10::BFloat16 in the extension, __half / __nv_bfloat16 in the standalone
// check): values go through float (exact for the 16-bit types) to acc_t, which is float, or
// double when either input is double. Offsets are int64.
#pragma once

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "common/pack.cuh"
#include "common/philox.h"
#include "kd_math.h"

namespace snnkd {
namespace kd {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kNldStats = 6;   // mean, scale, lse_q, lse_r, lse_p, kl (nld_cpu.cpp)
constexpr int kNldSums = 4;    // sum q A, sum r A, sum r A eps, sum r eps (NLD backward)

// float, or double when either input is double (kd_cpu.cpp's acc_dtype).

// x -> acc_t through float (exact for half/bfloat16; the 16-bit types convert to float only).
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T x) {
  if constexpr (std::is_same<T, double>::value) {
    return static_cast<acc_t>(x);
  } else {
    return static_cast<acc_t>(static_cast<float>(x));
  }
}

// acc_t -> T; a 16-bit type is built from float (as c10::Half(double) does on the CPU).
template <typename T, typename acc_t>
__device__ __forceinline__ T from_acc(acc_t x) {
  if constexpr (std::is_same<T, double>::value || std::is_same<T, float>::value) {
    return static_cast<T>(x);
  } else {
    return static_cast<T>(static_cast<float>(x));
  }
}

// A row's classes c = tid, tid + kThreads, ... in this thread's order, CHUNK at a time: a chunk's
// loads are all issued before any value is used, so CHUNK loads per thread (per row) are in flight.
// A plain strided loop whose body branches (the online log-sum-exp's new-maximum test, the head
// search's candidate test) keeps one: the compiler does not move a load above an earlier
// iteration's branch, and a row kernel has one block of 8 warps per row to hide latency with.
// f(c, value) sees the classes in the plain loop's order, so every per-thread sum is the same bits.
// THREADS: the block's size (the HTA head's blocks are larger where rows are few).
template <int CHUNK, int THREADS = kThreads, typename T, typename F>
__device__ __forceinline__ void for_each_class(const T* __restrict__ row, int64_t stride, int64_t C, F&& f) {
  for (int64_t c0 = threadIdx.x; c0 < C; c0 += static_cast<int64_t>(THREADS) * CHUNK) {
    T values[CHUNK] = {};
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) {
      const int64_t c = c0 + static_cast<int64_t>(i) * THREADS;
      if (c < C) values[i] = row[c * stride];
    }
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) {
      const int64_t c = c0 + static_cast<int64_t>(i) * THREADS;
      if (c < C) f(c, values[i]);
    }
  }
}

// The same over two rows of one sample read together (student and teacher): f(c, a value, b value).
template <int CHUNK, typename A, typename B, typename F>
__device__ __forceinline__ void for_each_class(const A* __restrict__ a, int64_t a_stride, const B* __restrict__ b,
                                               int64_t b_stride, int64_t C, F&& f) {
  for (int64_t c0 = threadIdx.x; c0 < C; c0 += static_cast<int64_t>(kThreads) * CHUNK) {
    A a_values[CHUNK] = {};
    B b_values[CHUNK] = {};
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) {
      const int64_t c = c0 + static_cast<int64_t>(i) * kThreads;
      if (c < C) {
        a_values[i] = a[c * a_stride];
        b_values[i] = b[c * b_stride];
      }
    }
#pragma unroll
    for (int i = 0; i < CHUNK; ++i) {
      const int64_t c = c0 + static_cast<int64_t>(i) * kThreads;
      if (c < C) f(c, a_values[i], b_values[i]);
    }
  }
}
// Classes per chunk: the forward's two rows, the HTA head's one (its passes run ~10 times per row).
constexpr int kPairChunk = 4;
constexpr int kTeacherChunk = 8;

// The KD row kernels' classes per access where the rows allow one 16-byte access per input: 16
// bytes of the wider of the two element types (4 fp32, 8 bf16/fp16, 2 double; a bf16 student with
// an fp32 teacher: 4).
template <typename s_t, typename u_t>
constexpr int kd_rows_pack() {
  return static_cast<int>(16 / (sizeof(s_t) > sizeof(u_t) ? sizeof(s_t) : sizeof(u_t)));
}

// The forward's: the same for float accumulation; one class per access in double, whose packed
// online updates (three of them for TSER) spill registers (ptxas: 912 bytes).
template <typename s_t, typename u_t>
constexpr int kd_forward_pack() {
  return std::is_same<acc_type_t<s_t, u_t>, double>::value ? 1 : kd_rows_pack<s_t, u_t>();
}

// Whether kd_forward_kernel and kd_backward_kernel may take VEC classes per access: unit class
// strides, C and every row stride a multiple of VEC (a [B, C] teacher's t stride is 0), and the
// inputs' starts aligned to a pack (the backward's outputs are fresh contiguous tensors: their rows
// start at multiples of C). The launchers (kd_cuda.cu, and the emulation's) fall back to VEC = 1.
inline bool kd_rows_packable(int vec, const void* s, size_t s_size, Strides ss, const void* u, size_t u_size,
                             Strides us, int64_t C) {
  if (vec <= 1) return vec == 1;
  return ss.c == 1 && us.c == 1 && C % vec == 0 && ss.b % vec == 0 && ss.t % vec == 0 && us.b % vec == 0 &&
         us.t % vec == 0 && pack_aligned(s, s_size * vec) && pack_aligned(u, u_size * vec);
}

// The same over two rows with unit class strides, VEC adjacent classes per access (Pack): packs
// p = tid, tid + kThreads, ... of classes VEC p .. VEC p + VEC - 1, CHUNK packs' loads issued before
// any is used. C % VEC == 0 and both rows aligned to a pack (kd_rows_packable). f(first class, a
// pack, b pack).
constexpr int kPackChunk = 2;
template <int VEC, typename A, typename B, typename F>
__device__ __forceinline__ void for_each_pack(const A* __restrict__ a, const B* __restrict__ b, int64_t C, F&& f) {
  const int64_t packs = C / VEC;
  for (int64_t p0 = threadIdx.x; p0 < packs; p0 += static_cast<int64_t>(kThreads) * kPackChunk) {
    Pack<A, VEC> a_packs[kPackChunk];
    Pack<B, VEC> b_packs[kPackChunk];
#pragma unroll
    for (int i = 0; i < kPackChunk; ++i) {
      const int64_t p = p0 + static_cast<int64_t>(i) * kThreads;
      if (p < packs) {
        a_packs[i] = load_pack<A, VEC>(a + p * VEC);
        b_packs[i] = load_pack<B, VEC>(b + p * VEC);
      }
    }
#pragma unroll
    for (int i = 0; i < kPackChunk; ++i) {
      const int64_t p = p0 + static_cast<int64_t>(i) * kThreads;
      if (p < packs) f(p * VEC, a_packs[i], b_packs[i]);
    }
  }
}

// A finite stand-in for -inf as the initial running maximum (Triton's NEG_BIG): exp(-inf - NEG_BIG)
// = 0 and an empty partial (l = 0) merges to nothing, so no lane needs a special case.
template <typename acc_t>
__device__ __forceinline__ acc_t neg_big() {
  return std::is_same<acc_t, double>::value ? acc_t(-DBL_MAX) : acc_t(-FLT_MAX);
}

// Order-preserving int64 image of a teacher logit: float_key of its float32 value for the float
// types (kd_math.h, as the stored HTA keys), the same construction on 64 bits for double, so that
// comparing keys is comparing the values the CPU kernel sorts (with -0.0 == +0.0).
template <typename T>
__device__ __forceinline__ int64_t sort_key(T x) {
  return static_cast<int64_t>(float_key(static_cast<float>(x)));
}
__device__ __forceinline__ int64_t sort_key(double x) {
  const long long bits = __double_as_longlong(x + 0.0);
  return static_cast<int64_t>(bits < 0 ? (bits ^ 0x7FFFFFFFFFFFFFFFLL) : bits);
}

// d scaled by a rescaling factor that may have underflowed to 0: the rescaled terms are then
// dropped as the CPU drops a term whose e^{x - max} is 0 (no inf * 0 = NaN).
template <typename acc_t>
__device__ __forceinline__ acc_t rescale(acc_t d, acc_t factor) {
  return factor > acc_t(0) ? d * factor : acc_t(0);
}

// Online log-sum-exp of x with a weighted sum d = sum e^{x - m} y (xlogy semantics: a zero weight
// drops y, even an infinite one).
template <typename acc_t>
struct Online {
  acc_t m, l, d;
};

template <typename acc_t>
__device__ __forceinline__ Online<acc_t> online_init() {
  return Online<acc_t>{neg_big<acc_t>(), acc_t(0), acc_t(0)};
}

template <bool WITH_D, typename acc_t>
__device__ __forceinline__ void online_push(Online<acc_t>& o, acc_t x, acc_t y) {
  if (x > o.m) {
    const acc_t factor = exp(o.m - x);
    o.l = o.l * factor + acc_t(1);
    if (WITH_D) o.d = rescale(o.d, factor) + y;
    o.m = x;
  } else {
    const acc_t e = exp(x - o.m);
    o.l += e;
    if (WITH_D) o.d += xmul(e, y);
  }
}

// VEC values at once: the pack's maximum first, then one rescale of the running sums and one exp
// per value, without the per-value branch of online_push (the forward's packed path). -inf values
// add 0 (a masked class); a +inf or NaN value makes l NaN, as the policy for such logits has it.
template <bool WITH_D, int VEC, typename acc_t>
__device__ __forceinline__ void online_push_pack(Online<acc_t>& o, const acc_t (&x)[VEC], const acc_t (&y)[VEC]) {
  acc_t m = o.m;
#pragma unroll
  for (int i = 0; i < VEC; ++i) m = x[i] > m ? x[i] : m;
  const acc_t factor = exp(o.m - m);
  acc_t l = o.l * factor;
  acc_t d = WITH_D ? rescale(o.d, factor) : acc_t(0);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const acc_t e = exp(x[i] - m);
    l += e;
    if (WITH_D) d += xmul(e, y[i]);
  }
  o = Online<acc_t>{m, l, d};
}

template <typename acc_t>
__device__ __forceinline__ Online<acc_t> online_merge(const Online<acc_t>& a, const Online<acc_t>& b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  const acc_t fa = exp(a.m - m), fb = exp(b.m - m);
  return Online<acc_t>{m, a.l * fa + b.l * fb, rescale(a.d, fa) + rescale(b.d, fb)};
}

template <typename acc_t>
__device__ __forceinline__ acc_t online_lse(const Online<acc_t>& o) {
  return o.m + log(o.l);
}

// Plain reduction operators (cub::Sum / cub::Min are gone from CCCL 3).
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a + b;
  }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return b < a ? b : a;
  }
};

struct OnlineMerge {
  template <typename acc_t>
  __device__ __forceinline__ Online<acc_t> operator()(const Online<acc_t>& a, const Online<acc_t>& b) const {
    return online_merge(a, b);
  }
};

// N online statistics merged in one block reduction.
template <typename acc_t, int N>
struct OnlineN {
  Online<acc_t> o[N];
};
struct OnlineNMerge {
  template <typename acc_t, int N>
  __device__ __forceinline__ OnlineN<acc_t, N> operator()(const OnlineN<acc_t, N>& a,
                                                          const OnlineN<acc_t, N>& b) const {
    OnlineN<acc_t, N> r;
#pragma unroll
    for (int i = 0; i < N; ++i) r.o[i] = online_merge(a.o[i], b.o[i]);
    return r;
  }
};

// N plain sums in one block reduction.
template <typename acc_t, int N>
struct SumN {
  acc_t v[N];
};
struct SumNOp {
  template <typename acc_t, int N>
  __device__ __forceinline__ SumN<acc_t, N> operator()(const SumN<acc_t, N>& a, const SumN<acc_t, N>& b) const {
    SumN<acc_t, N> r;
#pragma unroll
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
};

// Block-wide reduction whose result every thread gets. Every thread of the block must call it
// (the calls sit only in block-uniform control flow). The trailing barrier lets the next call
// reuse `temp` and `slot` right away.
template <typename T, typename Op, int THREADS = kThreads>
__device__ __forceinline__ T block_all_reduce(T value, Op op, typename cub::BlockReduce<T, THREADS>::TempStorage& temp,
                                              T& slot) {
  const T total = cub::BlockReduce<T, THREADS>(temp).Reduce(value, op);
  if (threadIdx.x == 0) slot = total;
  __syncthreads();
  const T result = slot;
  __syncthreads();
  return result;
}


// ------------------------------------------------------------------------------------------------
// KL / TSER / HTA-KL (kd_cpu.cpp)
// ------------------------------------------------------------------------------------------------

// HTA head of each teacher row: keys[row] = (key_cross, idx_cross, idx_top), the CPU's rule
// (TeacherRow::select_head, kd_cpu_rows.h) without a sort. The crossing class's key is the largest
// key k whose mass(key >= k) reaches head_threshold: a search over the order-preserving keys that
// tests kHtaCandidates of them per read of the row (as the Triton kernel), each read shrinking an
// interval [lo, hi] that holds the crossing key ~17-fold (at most hta_search_reads: 8 for float
// logits). The mass above the interval, mass(key > hi), is carried from read to read -- it is a
// candidate's mass of the read before --, so a read sums only the classes inside the interval:
// after the first reads these are few, and every other class costs a load and two compares, no exp
// and no candidate compares (on an H200 the head took 0.50 ms of HTA-KL's 0.84 at 256 rows of
// 32,000 classes when each read took both for every class above the interval's lower end). Among
// the classes tied at the crossing key, the index-order walk then finds the first one where the
// inclusive cumulative probability reaches the threshold. The masses are summed in double; each
// probability is a float exp for float, half and bf16 logits (teacher_prob), its double argument
// z / tau - lse rounded to float first (|arg| ~ 10: ~5e-7 relative at most, alike over the classes
// of one logit value), so the head differs from the float64 order only for a cumulative mass within
// a few 1e-7 of the threshold.
//
// Two forms of one algorithm: hta_teacher_kernel, one block per row, where the rows fill the GPU;
// and the split head (hta_split_*_kernel) where they are too few (hta_head_splits): each row's
// classes are cut into slices of one block each, and every read is one launch whose blocks first
// merge the slices' sums of the launch before, in slice order (deterministic, no atomics).
constexpr int kHtaCandidates = 16;  // keys tested per read of the row by the threshold search

struct HtaPass1 {
  Online<double> lse;
  int64_t key_max, key_min, top;  // top: lowest index among the key_max classes (C when empty)
};
struct HtaPass1Merge {
  __device__ __forceinline__ HtaPass1 operator()(const HtaPass1& a, const HtaPass1& b) const {
    HtaPass1 r;
    r.lse = online_merge(a.lse, b.lse);
    r.key_max = a.key_max > b.key_max ? a.key_max : b.key_max;
    r.key_min = a.key_min < b.key_min ? a.key_min : b.key_min;
    r.top = a.key_max > b.key_max ? a.top : (b.key_max > a.key_max ? b.top : (a.top < b.top ? a.top : b.top));
    return r;
  }
};

// The classes tied at the crossing key: how many, the lowest index (C when none) and its probability.
struct TiedClasses {
  int64_t count, first;
  double first_prob;
};
struct TiedClassesMerge {
  __device__ __forceinline__ TiedClasses operator()(const TiedClasses& a, const TiedClasses& b) const {
    const TiedClasses& lower = a.first < b.first ? a : b;
    return TiedClasses{a.count + b.count, lower.first, lower.first_prob};
  }
};

// A row's search: the interval [lo, hi] of keys holding the crossing key, the mass above it
// (mass(key > hi)), the row's log-sum-exp of z / tau and its top-1 class.
struct HtaSearch {
  int64_t lo, hi;
  double above, lse;
  int64_t top;
};

// Reads of the row the search takes at most for keys spanning `span` (hi - lo): a read of step
// ceil(span / 17) leaves an interval at most max(step - 1, span - 16 step) wide (hta_candidates,
// hta_narrow). 8 for the 2^32 keys of a float logit, 17 for a double's 2^64.
inline constexpr int hta_search_reads(uint64_t span) {
  int reads = 0;
  while (span > 0) {
    const uint64_t step = span / (kHtaCandidates + 1) + (span % (kHtaCandidates + 1) != 0);
    const uint64_t last = span > kHtaCandidates * step ? span - kHtaCandidates * step : 0;
    span = step - 1 > last ? step - 1 : last;
    ++reads;
  }
  return reads;
}
template <typename u_t>
inline constexpr int hta_search_reads() {
  return hta_search_reads(std::is_same<u_t, double>::value ? ~uint64_t(0) : uint64_t(0xFFFFFFFFu));
}

constexpr int kHtaWideThreads = 512;
// hta_teacher_kernel's block size for `rows` teacher rows on a GPU of `multiprocessors`.
inline int hta_head_threads(int64_t rows, int64_t multiprocessors) {
  return rows < multiprocessors ? kHtaWideThreads : kThreads;
}

// The split head's geometry. Its kernels hold <= 80 registers per thread in 256-thread blocks
// (ptxas, sm_90): three blocks per multiprocessor. Rows fewer than those slots are cut into as many
// slices as fill them (at 64 rows on 132 multiprocessors: 6 slices, 384 blocks for 396 slots,
// where one block per row left 68 multiprocessors idle and 8 warps on each of the others), each at
// least kHtaSliceMin classes (64 per thread: a read of a shorter row takes a few microseconds in one
// block, about what each of the split head's 11 launches costs the host). 1: one block per row
// (hta_teacher_kernel), as from 198 rows up or below 32,768 classes.
constexpr int kHtaSplitBlocksPerMultiprocessor = 3;
constexpr int64_t kHtaSliceMin = 16384;
constexpr int64_t kHtaSliceAlign = 64;  // slices start at multiples of 64 classes (256-byte lines of fp32)
inline int64_t hta_head_splits(int64_t rows, int64_t C, int64_t multiprocessors) {
  const int64_t slots = kHtaSplitBlocksPerMultiprocessor * multiprocessors;
  if (rows <= 0 || rows >= slots) return 1;
  const int64_t by_slots = slots / rows, by_classes = C / kHtaSliceMin;
  const int64_t splits = by_slots < by_classes ? by_slots : by_classes;
  return splits > 1 ? splits : 1;
}
// Classes per slice for `splits` slices (rounded up to kHtaSliceAlign; the slices actually launched
// are ceil(C / slice), which may be fewer than `splits`).
inline int64_t hta_head_slice(int64_t C, int64_t splits) {
  const int64_t slice = (C + splits - 1) / splits;
  return (slice + kHtaSliceAlign - 1) / kHtaSliceAlign * kHtaSliceAlign;
}

// The split head's scratch, one allocation: pass-1 partials [rows * slices], the search states
// [2][rows] and the interval sums [2][rows * slices] (by the parity of the read that writes them:
// a read's blocks take the read before's while the row's first block writes its own), the tied
// classes' partials [rows * slices]. Byte offsets; every section a multiple of 16 bytes.
struct HtaSplitScratch {
  int64_t pass1, search, inside, tied, bytes;
};
inline int64_t hta_round16(int64_t bytes) { return (bytes + 15) / 16 * 16; }
inline HtaSplitScratch hta_split_scratch(int64_t rows, int64_t slices) {
  HtaSplitScratch s{};
  s.pass1 = 0;
  s.search = s.pass1 + hta_round16(rows * slices * static_cast<int64_t>(sizeof(HtaPass1)));
  s.inside = s.search + hta_round16(2 * rows * static_cast<int64_t>(sizeof(HtaSearch)));
  s.tied = s.inside + hta_round16(2 * rows * slices * static_cast<int64_t>(sizeof(SumN<double, kHtaCandidates>)));
  s.bytes = s.tied + hta_round16(rows * slices * static_cast<int64_t>(sizeof(TiedClasses)));
  return s;
}

// p = e^{z / tau - lse} of a teacher logit, the argument in double. A double exp is a long FP64
// routine, and the bisection takes ~33 per element: in float (single-precision exp, its error far
// below the 2^-24 resolution a float logit has anyway) for every logit type but double.
template <typename u_t>
__device__ __forceinline__ double teacher_prob(u_t z, double inv_tau, double lse) {
  const double arg = to_acc<double>(z) * inv_tau - lse;
  if constexpr (std::is_same<u_t, double>::value) {
    return exp(arg);
  } else {
    return static_cast<double>(expf(static_cast<float>(arg)));
  }
}

// This thread's part of pass 1 over `count` classes of a row starting at class `first`:
// log-sum-exp, extreme keys, top-1 (lowest index among equal maxima).
template <int THREADS, typename u_t>
__device__ __forceinline__ HtaPass1 hta_pass1(const u_t* __restrict__ u, int64_t stride, int64_t first, int64_t count,
                                              int64_t C, double inv_tau) {
  HtaPass1 p{online_init<double>(), INT64_MIN, INT64_MAX, C};
  for_each_class<kTeacherChunk, THREADS>(u + first * stride, stride, count, [&](int64_t c, u_t z) {
    online_push<false>(p.lse, to_acc<double>(z) * inv_tau, 0.0);
    const int64_t key = sort_key(z);
    if (key > p.key_max) {  // c increases: the first maximum of this thread is its lowest index
      p.key_max = key;
      p.top = first + c;
    }
    p.key_min = key < p.key_min ? key : p.key_min;
  });
  return p;
}

// The type the search compares a logit's key in: int32 for the float types (float_key's image),
// int64 for double -- the candidates of a read then take 16 registers, not 32, and one compare each.
template <typename u_t>
using hta_key_t = typename std::conditional<std::is_same<u_t, double>::value, int64_t, int32_t>::type;

__device__ __forceinline__ HtaSearch hta_search_start(const HtaPass1& p) {
  return HtaSearch{p.key_min, p.key_max, 0.0, online_lse(p.lse), p.top};
}

// The keys a read tests: kHtaCandidates keys splitting (lo, hi] evenly, increasing (several equal
// to hi when the interval is narrower than the candidates).
template <typename key_t>
__device__ __forceinline__ void hta_candidates(const HtaSearch& s, key_t (&candidate)[kHtaCandidates]) {
  const uint64_t span = static_cast<uint64_t>(s.hi) - static_cast<uint64_t>(s.lo);
  const uint64_t step = span / (kHtaCandidates + 1) + (span % (kHtaCandidates + 1) != 0);  // >= 1
#pragma unroll
  for (int j = 0; j < kHtaCandidates; ++j) {
    const uint64_t offset = static_cast<uint64_t>(j + 1) * step;  // < 2^64: step <= 2^64 / 17 + 1
    const uint64_t key = static_cast<uint64_t>(s.lo) + (offset < span ? offset : span);
    candidate[j] = static_cast<key_t>(static_cast<int64_t>(key));
  }
}

// This thread's sums of p over its classes with candidate[j] <= key <= hi, per candidate, over
// `count` classes from `first`. The classes above hi are in s.above already; those below
// candidate[0] count for no candidate.
template <int THREADS, typename u_t>
__device__ __forceinline__ SumN<double, kHtaCandidates> hta_inside_masses(
    const u_t* __restrict__ u, int64_t stride, int64_t first, int64_t count, const HtaSearch& s,
    const hta_key_t<u_t> (&candidate)[kHtaCandidates], double inv_tau) {
  SumN<double, kHtaCandidates> mass;
#pragma unroll
  for (int j = 0; j < kHtaCandidates; ++j) mass.v[j] = 0.0;
  const hta_key_t<u_t> hi = static_cast<hta_key_t<u_t>>(s.hi);
  for_each_class<kTeacherChunk, THREADS>(u + first * stride, stride, count, [&](int64_t, u_t z) {
    const hta_key_t<u_t> key = static_cast<hta_key_t<u_t>>(sort_key(z));
    if (key >= candidate[0] && key <= hi) {
      const double prob = teacher_prob(z, inv_tau, s.lse);
#pragma unroll
      for (int j = 0; j < kHtaCandidates; ++j) {
        if (key >= candidate[j]) mass.v[j] += prob;
      }
    }
  });
  return mass;
}

// One read's outcome from the row's interval sums `inside` (hta_inside_masses summed over the
// row): mass(key >= candidate[j]) = s.above + inside[j]. The candidates that reach the threshold are
// a prefix (the mass falls as the key rises); the crossing key lies from the last of them (lo when
// none) up to the next candidate - 1 (hi when none), whose mass is the new interval's mass above.
template <typename key_t>
__device__ __forceinline__ void hta_narrow(HtaSearch& s, const key_t (&candidate)[kHtaCandidates],
                                           const SumN<double, kHtaCandidates>& inside, double head_threshold) {
  int64_t new_lo = s.lo, new_hi = s.hi;
  double new_above = s.above;
#pragma unroll
  for (int j = kHtaCandidates - 1; j >= 0; --j) {
    const double mass = s.above + inside.v[j];
    if (mass >= head_threshold) {
      new_lo = candidate[j];
      break;
    }
    new_hi = static_cast<int64_t>(candidate[j]) - 1;
    new_above = mass;
  }
  s.lo = new_lo;
  s.hi = new_hi;
  s.above = new_above;
}

// This thread's classes tied at the crossing key among `count` from `first`.
template <int THREADS, typename u_t>
__device__ __forceinline__ TiedClasses hta_tied_classes(const u_t* __restrict__ u, int64_t stride, int64_t first,
                                                        int64_t count, int64_t C, int64_t key_cross, double inv_tau,
                                                        double lse) {
  TiedClasses tied{0, C, 0.0};
  for_each_class<kTeacherChunk, THREADS>(u + first * stride, stride, count, [&](int64_t c, u_t z) {
    if (sort_key(z) == key_cross && tied.count++ == 0) {  // c increases: this thread's first tied class
      tied.first = first + c;
      tied.first_prob = teacher_prob(z, inv_tau, lse);
    }
  });
  return tied;
}

// The crossing class from the converged search (s.lo == s.hi, the crossing key; s.above its
// cumulative mass before the tied classes) and the row's tied classes: the first tied class, in
// index order, where s.above plus the tied classes' inclusive cumulative probability reaches the
// threshold; C when none does (every class is head). One tied class (a float logit rarely ties) is
// the crossing itself when its probability brings the mass to the threshold -- the walk's test,
// which otherwise takes a block scan and reduction per THREADS classes up to the crossing class.
// Every thread of the block calls it (block-uniform arguments).
template <int THREADS, typename u_t>
__device__ __forceinline__ int64_t hta_crossing_class(
    const u_t* __restrict__ u, int64_t stride, int64_t C, const HtaSearch& s, const TiedClasses& tied,
    double head_threshold, double inv_tau, typename cub::BlockScan<double, THREADS>::TempStorage& scan_temp,
    typename cub::BlockReduce<int64_t, THREADS>::TempStorage& min_temp, int64_t& min_slot) {
  double running = s.above;
  if (tied.count == 1) {
    // the walk's inclusive sum at that class is its probability (the other lanes add +0.0)
    return running + tied.first_prob >= head_threshold ? tied.first : C;
  }
  for (int64_t c0 = 0; c0 < C; c0 += THREADS) {  // block-uniform trip count (exits on a block-uniform hit)
    const int64_t c = c0 + threadIdx.x;
    bool is_tied = false;
    double prob = 0.0;
    if (c < C) {
      const u_t z = u[c * stride];
      is_tied = sort_key(z) == s.lo;
      if (is_tied) prob = teacher_prob(z, inv_tau, s.lse);
    }
    double inclusive, chunk_total;
    cub::BlockScan<double, THREADS>(scan_temp).InclusiveSum(prob, inclusive, chunk_total);
    const int64_t hit = is_tied && running + inclusive >= head_threshold ? c : C;
    // also fences scan_temp
    const int64_t crossing = block_all_reduce<int64_t, MinOp, THREADS>(hit, MinOp(), min_temp, min_slot);
    if (crossing < C) return crossing;
    running += chunk_total;
  }
  return C;
}

template <typename u_t>
__device__ __forceinline__ void hta_store_keys(int32_t* __restrict__ out, const u_t* __restrict__ u, int64_t stride,
                                               int64_t C, int64_t top, int64_t idx_cross) {
  out[kIdxTop] = static_cast<int32_t>(top < C ? top : 0);
  out[kIdxCross] = static_cast<int32_t>(idx_cross);
  out[kKeyCross] = idx_cross < C ? float_key(static_cast<float>(u[idx_cross * stride])) : INT32_MIN;
}

// Teacher row `row` (= t * B + b) of U.
template <typename u_t>
__device__ __forceinline__ const u_t* hta_row(const u_t* U, Strides us, int64_t B, int64_t row) {
  return U + (row / B) * us.t + (row % B) * us.b;
}

// One block per teacher row (grid Tt * B). THREADS per block: kThreads, or kHtaWideThreads where
// the teacher rows are fewer than the GPU's multiprocessors and too short to split
// (hta_head_threads, hta_head_splits).
template <typename u_t, int THREADS = kThreads>
__global__ void __launch_bounds__(THREADS)
    hta_teacher_kernel(const u_t* __restrict__ U, Strides us, int64_t B, int64_t C, double inv_tau,
                       double head_threshold, int32_t* __restrict__ keys) {
  __shared__ typename cub::BlockReduce<HtaPass1, THREADS>::TempStorage pass1_temp;
  __shared__ HtaPass1 pass1_slot;
  __shared__ typename cub::BlockReduce<SumN<double, kHtaCandidates>, THREADS>::TempStorage candidates_temp;
  __shared__ SumN<double, kHtaCandidates> candidates_slot;
  __shared__ typename cub::BlockReduce<TiedClasses, THREADS>::TempStorage tied_temp;
  __shared__ TiedClasses tied_slot;
  __shared__ typename cub::BlockScan<double, THREADS>::TempStorage scan_temp;
  __shared__ typename cub::BlockReduce<int64_t, THREADS>::TempStorage min_temp;
  __shared__ int64_t min_slot;

  const int64_t row = blockIdx.x;
  const u_t* u = hta_row(U, us, B, row);

  HtaPass1 p = hta_pass1<THREADS>(u, us.c, 0, C, C, inv_tau);
  p = block_all_reduce<HtaPass1, HtaPass1Merge, THREADS>(p, HtaPass1Merge(), pass1_temp, pass1_slot);
  HtaSearch s = hta_search_start(p);  // block-uniform, and so is every step below
  while (s.lo < s.hi) {
    hta_key_t<u_t> candidate[kHtaCandidates];
    hta_candidates(s, candidate);
    SumN<double, kHtaCandidates> inside = hta_inside_masses<THREADS>(u, us.c, 0, C, s, candidate, inv_tau);
    inside = block_all_reduce<SumN<double, kHtaCandidates>, SumNOp, THREADS>(inside, SumNOp(), candidates_temp,
                                                                             candidates_slot);
    hta_narrow(s, candidate, inside, head_threshold);
  }
  TiedClasses tied = hta_tied_classes<THREADS>(u, us.c, 0, C, C, s.lo, inv_tau, s.lse);
  tied = block_all_reduce<TiedClasses, TiedClassesMerge, THREADS>(tied, TiedClassesMerge(), tied_temp, tied_slot);
  const int64_t idx_cross =
      hta_crossing_class<THREADS>(u, us.c, C, s, tied, head_threshold, inv_tau, scan_temp, min_temp, min_slot);
  if (threadIdx.x == 0) hta_store_keys(keys + row * kHtaNum, u, us.c, C, s.top, idx_cross);
}

// The split head (hta_head_splits > 1): grid rows * slices, block (row, slice) = blockIdx.x
// (row-major), slice j over classes [j * slice, min(C, (j + 1) * slice)). Launched in this order on
// one stream: hta_split_pass1_kernel; hta_split_search_kernel for read = 0 .. reads - 1
// (hta_search_reads<u_t>()); hta_split_tied_kernel with read = reads; hta_split_finish_kernel
// (grid rows) with read = reads. Each launch's block merges the partials of the launch before in
// slice order (thread 0: a few dozen at most), so every block of a row holds the same state.
struct HtaSplit {
  int64_t rows, slices, slice;
};

// The slices of `rows` rows of C classes for `splits` asked for (hta_head_splits): hta_head_slice's
// classes each, ceil(C / slice) of them.
inline HtaSplit hta_split(int64_t rows, int64_t C, int64_t splits) {
  const int64_t slice = hta_head_slice(C, splits);
  return HtaSplit{rows, (C + slice - 1) / slice, slice};
}

// This block's row, slice index and classes [first, first + count).
struct HtaBlockSlice {
  int64_t row, index, first, count;
};
__device__ __forceinline__ HtaBlockSlice hta_block_slice(HtaSplit split, int64_t C) {
  const int64_t row = blockIdx.x / split.slices, index = blockIdx.x % split.slices, first = index * split.slice;
  return HtaBlockSlice{row, index, first, C - first < split.slice ? C - first : split.slice};
}

template <typename u_t, int THREADS = kThreads>
__global__ void __launch_bounds__(THREADS)
    hta_split_pass1_kernel(const u_t* __restrict__ U, Strides us, int64_t B, int64_t C, HtaSplit split,
                           double inv_tau, HtaPass1* __restrict__ pass1) {
  __shared__ typename cub::BlockReduce<HtaPass1, THREADS>::TempStorage pass1_temp;
  __shared__ HtaPass1 pass1_slot;
  const HtaBlockSlice part = hta_block_slice(split, C);
  HtaPass1 p = hta_pass1<THREADS>(hta_row(U, us, B, part.row), us.c, part.first, part.count, C, inv_tau);
  p = block_all_reduce<HtaPass1, HtaPass1Merge, THREADS>(p, HtaPass1Merge(), pass1_temp, pass1_slot);
  if (threadIdx.x == 0) pass1[blockIdx.x] = p;
}

// A row's partials of its `slices` slices merged in slice order (the split head's fixed order).
template <typename T, typename Op>
__device__ __forceinline__ T hta_merge_slices(const T* __restrict__ partials, int64_t slices, Op op) {
  T merged = partials[0];
  for (int64_t j = 1; j < slices; ++j) merged = op(merged, partials[j]);
  return merged;
}

// The row's search state before this launch's read, block-uniform (every thread calls it): read 0
// starts it from the pass-1 partials; a later read narrows the state of the read before with that
// read's interval sums, each candidate's summed over the slices in slice order by one thread. The
// row's first block records it for the next launch (into the other parity's slot).
template <typename u_t>
__device__ __forceinline__ HtaSearch hta_split_state(HtaSplit split, int read, double head_threshold,
                                                     const HtaPass1* __restrict__ pass1, HtaSearch* search,
                                                     const SumN<double, kHtaCandidates>* inside, HtaSearch& state,
                                                     SumN<double, kHtaCandidates>& merged) {
  const int64_t row = blockIdx.x / split.slices;
  if (read == 0) {
    if (threadIdx.x == 0) {
      state = hta_search_start(hta_merge_slices(pass1 + row * split.slices, split.slices, HtaPass1Merge()));
    }
  } else {
    const int before = (read - 1) & 1;
    const HtaSearch s = search[before * split.rows + row];
    const bool narrow = s.lo < s.hi;
    if (narrow && threadIdx.x < kHtaCandidates) {
      const SumN<double, kHtaCandidates>* sums = inside + (before * split.rows + row) * split.slices;
      double total = sums[0].v[threadIdx.x];
      for (int64_t j = 1; j < split.slices; ++j) total += sums[j].v[threadIdx.x];
      merged.v[threadIdx.x] = total;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      HtaSearch next = s;
      if (narrow) {
        hta_key_t<u_t> candidate[kHtaCandidates];
        hta_candidates(next, candidate);
        hta_narrow(next, candidate, merged, head_threshold);
      }
      state = next;
    }
  }
  __syncthreads();
  const HtaSearch s = state;
  if (threadIdx.x == 0 && blockIdx.x % split.slices == 0) search[(read & 1) * split.rows + row] = s;
  return s;
}

template <typename u_t, int THREADS = kThreads>
__global__ void __launch_bounds__(THREADS)
    hta_split_search_kernel(const u_t* __restrict__ U, Strides us, int64_t B, int64_t C, HtaSplit split,
                            double inv_tau, double head_threshold, int read, const HtaPass1* __restrict__ pass1,
                            HtaSearch* search, SumN<double, kHtaCandidates>* inside) {
  __shared__ typename cub::BlockReduce<SumN<double, kHtaCandidates>, THREADS>::TempStorage candidates_temp;
  __shared__ SumN<double, kHtaCandidates> candidates_slot;
  __shared__ HtaSearch state;
  const HtaSearch s =
      hta_split_state<u_t>(split, read, head_threshold, pass1, search, inside, state, candidates_slot);
  if (s.lo >= s.hi) return;  // converged (block-uniform): no sums for the next launch to merge
  const HtaBlockSlice part = hta_block_slice(split, C);
  hta_key_t<u_t> candidate[kHtaCandidates];
  hta_candidates(s, candidate);
  const u_t* u = hta_row(U, us, B, part.row);
  SumN<double, kHtaCandidates> sums =
      hta_inside_masses<THREADS>(u, us.c, part.first, part.count, s, candidate, inv_tau);
  sums = block_all_reduce<SumN<double, kHtaCandidates>, SumNOp, THREADS>(sums, SumNOp(), candidates_temp,
                                                                         candidates_slot);
  if (threadIdx.x == 0) inside[((read & 1) * split.rows + part.row) * split.slices + part.index] = sums;
}

// The last narrowing (read = hta_search_reads: the search has converged after it) and each slice's
// classes tied at the crossing key.
template <typename u_t, int THREADS = kThreads>
__global__ void __launch_bounds__(THREADS)
    hta_split_tied_kernel(const u_t* __restrict__ U, Strides us, int64_t B, int64_t C, HtaSplit split,
                          double inv_tau, double head_threshold, int read, HtaSearch* search,
                          const SumN<double, kHtaCandidates>* __restrict__ inside, TiedClasses* __restrict__ tied) {
  __shared__ typename cub::BlockReduce<TiedClasses, THREADS>::TempStorage tied_temp;
  __shared__ TiedClasses tied_slot;
  __shared__ HtaSearch state;
  __shared__ SumN<double, kHtaCandidates> merged;
  const HtaSearch s = hta_split_state<u_t>(split, read, head_threshold, nullptr, search, inside, state, merged);
  const HtaBlockSlice part = hta_block_slice(split, C);
  TiedClasses t =
      hta_tied_classes<THREADS>(hta_row(U, us, B, part.row), us.c, part.first, part.count, C, s.lo, inv_tau, s.lse);
  t = block_all_reduce<TiedClasses, TiedClassesMerge, THREADS>(t, TiedClassesMerge(), tied_temp, tied_slot);
  if (threadIdx.x == 0) tied[blockIdx.x] = t;
}

// One block per row: the crossing class from the converged search and the slices' tied classes.
template <typename u_t, int THREADS = kThreads>
__global__ void __launch_bounds__(THREADS)
    hta_split_finish_kernel(const u_t* __restrict__ U, Strides us, int64_t B, int64_t C, HtaSplit split,
                            double inv_tau, double head_threshold, int read, const HtaSearch* __restrict__ search,
                            const TiedClasses* __restrict__ tied, int32_t* __restrict__ keys) {
  __shared__ typename cub::BlockScan<double, THREADS>::TempStorage scan_temp;
  __shared__ typename cub::BlockReduce<int64_t, THREADS>::TempStorage min_temp;
  __shared__ int64_t min_slot;
  __shared__ TiedClasses row_tied;
  const int64_t row = blockIdx.x;
  if (threadIdx.x == 0) row_tied = hta_merge_slices(tied + row * split.slices, split.slices, TiedClassesMerge());
  __syncthreads();
  const HtaSearch s = search[(read & 1) * split.rows + row];
  const u_t* u = hta_row(U, us, B, row);
  const int64_t idx_cross =
      hta_crossing_class<THREADS>(u, us.c, C, s, row_tied, head_threshold, inv_tau, scan_temp, min_temp, min_slot);
  if (threadIdx.x == 0) hta_store_keys(keys + row * kHtaNum, u, us.c, C, s.top, idx_cross);
}

// The split head's launches, in order, for kd_cuda.cu and the CPU emulation alike: launch(kernel,
// blocks, args...) runs `kernel` in blocks of kThreads threads on one stream. `scratch`: at least
// hta_split_scratch(split.rows, split.slices).bytes, 16-byte aligned.
template <typename u_t, typename Launch>
void hta_split_head(Launch&& launch, const u_t* U, Strides us, int64_t B, int64_t C, HtaSplit split, double inv_tau,
                    double head_threshold, unsigned char* scratch, int32_t* keys) {
  const HtaSplitScratch layout = hta_split_scratch(split.rows, split.slices);
  auto* pass1 = reinterpret_cast<HtaPass1*>(scratch + layout.pass1);
  auto* search = reinterpret_cast<HtaSearch*>(scratch + layout.search);
  auto* inside = reinterpret_cast<SumN<double, kHtaCandidates>*>(scratch + layout.inside);
  auto* tied = reinterpret_cast<TiedClasses*>(scratch + layout.tied);
  const int64_t blocks = split.rows * split.slices;
  launch(hta_split_pass1_kernel<u_t, kThreads>, blocks, U, us, B, C, split, inv_tau, pass1);
  constexpr int reads = hta_search_reads<u_t>();
  for (int read = 0; read < reads; ++read) {
    launch(hta_split_search_kernel<u_t, kThreads>, blocks, U, us, B, C, split, inv_tau, head_threshold, read,
           static_cast<const HtaPass1*>(pass1), search, inside);
  }
  launch(hta_split_tied_kernel<u_t, kThreads>, blocks, U, us, B, C, split, inv_tau, head_threshold, reads, search,
         static_cast<const SumN<double, kHtaCandidates>*>(inside), tied);
  launch(hta_split_finish_kernel<u_t, kThreads>, split.rows, U, us, B, C, split, inv_tau, head_threshold, reads,
         static_cast<const HtaSearch*>(search), static_cast<const TiedClasses*>(tied), keys);
}

// Forward, one block per row (grid T * B): online LSE of s = z_s / tau and u = z_t / tau with
// sum e^{u - m_u} (u - s) (and sum e^{s - m_s} (s - u) for HTA, the TSER entropy LSE at tau_H with
// sum e^{s_H - m_h} s_H), one block reduction; HTA then needs a second pass for the head/tail gaps.
// rows [T, B] and stats [T, B, kNumStats] as kd_cpu.cpp's forward_kernel. VEC > 1 (kd_forward_pack,
// where kd_rows_packable holds): VEC classes per access and per online update (the pack's maximum
// first, online_push_pack), where one class at a time issued ~55-60 instructions per class and ran
// no faster in bf16 than in fp32 on an H200 (benchmarks/GPU_NOTES.md, session 15). The sums then
// round differently from VEC = 1's (the same values to rounding).
//
// WITH_GRAD (kd_forward_student_grad_kernel; the eager autograd kernel's precomputed gradient,
// csrc/kd/kd_autograd.cpp): the block then also writes its row of the student's gradient at a row
// gradient of grad_weight, grad_s [T, B, C] contiguous -- kd_backward_kernel's formula with the
// statistics still in registers, the same bits as the row backward's at grad_rows = grad_weight.
// The row is read again: from L2 where the rows in flight fit, from HBM at C = 32,000+
// (GPU_NOTES.md, session 19).
template <typename s_t, typename u_t, int LOSS, int VEC, bool WITH_GRAD>
__device__ __forceinline__ void kd_forward_row(const s_t* __restrict__ S, Strides ss, const u_t* __restrict__ U,
                                               Strides us, bool teacher_per_t, int64_t B, int64_t C,
                                               acc_type_t<s_t, u_t> inv_tau, acc_type_t<s_t, u_t> inv_tau_h,
                                               acc_type_t<s_t, u_t> tau_sq, acc_type_t<s_t, u_t> entropy_weight,
                                               const int32_t* __restrict__ hta_keys,
                                               acc_type_t<s_t, u_t>* __restrict__ rows,
                                               acc_type_t<s_t, u_t>* __restrict__ stats, acc_type_t<s_t, u_t> tau,
                                               acc_type_t<s_t, u_t> grad_weight, s_t* __restrict__ grad_s) {
  using acc_t = acc_type_t<s_t, u_t>;
  constexpr int N = LOSS == kTSER ? 3 : 2;  // o[0]: teacher (d = sum p (u - s)), o[1]: student, o[2]: tau_H
  using Acc = OnlineN<acc_t, N>;
  using Gaps = SumN<acc_t, 2>;
  __shared__ typename cub::BlockReduce<Acc, kThreads>::TempStorage acc_temp;
  __shared__ Acc acc_slot;
  __shared__ typename cub::BlockReduce<Gaps, kThreads>::TempStorage gap_temp;
  __shared__ Gaps gap_slot;

  const int64_t row = blockIdx.x;
  const int64_t t = row / B, b = row % B, tt = teacher_per_t ? t : 0;
  const s_t* s = S + t * ss.t + b * ss.b;
  const u_t* u = U + tt * us.t + b * us.b;
  const int tid = threadIdx.x;

  Acc a;
#pragma unroll
  for (int i = 0; i < N; ++i) a.o[i] = online_init<acc_t>();
  if constexpr (VEC == 1) {
    for_each_class<kPairChunk>(s, ss.c, u, us.c, C, [&](int64_t, s_t s_value, u_t u_value) {
      const acc_t zs = to_acc<acc_t>(s_value);
      const acc_t sv = zs * inv_tau, uv = to_acc<acc_t>(u_value) * inv_tau;
      online_push<true>(a.o[0], uv, uv - sv);
      online_push<LOSS == kHTA>(a.o[1], sv, sv - uv);
      if constexpr (LOSS == kTSER) {
        const acc_t sh = zs * inv_tau_h;
        online_push<true>(a.o[N - 1], sh, sh);
      }
    });
  } else {  // unit class strides, VEC classes per access (kd_rows_packable)
    for_each_pack<VEC>(s, u, C, [&](int64_t, const Pack<s_t, VEC>& s_pack, const Pack<u_t, VEC>& u_pack) {
      acc_t sv[VEC], uv[VEC], u_minus_s[VEC], s_minus_u[VEC], sh[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t zs = to_acc<acc_t>(s_pack.v[i]);
        sv[i] = zs * inv_tau;
        uv[i] = to_acc<acc_t>(u_pack.v[i]) * inv_tau;
        u_minus_s[i] = uv[i] - sv[i];
        s_minus_u[i] = sv[i] - uv[i];
        sh[i] = zs * inv_tau_h;
      }
      online_push_pack<true>(a.o[0], uv, u_minus_s);
      online_push_pack<LOSS == kHTA>(a.o[1], sv, s_minus_u);
      if constexpr (LOSS == kTSER) online_push_pack<true>(a.o[N - 1], sh, sh);
    });
  }
  a = block_all_reduce(a, OnlineNMerge(), acc_temp, acc_slot);
  const acc_t lse_u = online_lse(a.o[0]), lse_s = online_lse(a.o[1]);
  const acc_t kl_f = a.o[0].d / a.o[0].l - lse_u + lse_s;
  acc_t loss = tau_sq * kl_f, aux0 = acc_t(0), aux1 = acc_t(0);
  if constexpr (LOSS == kTSER) {
    const acc_t lse_h = online_lse(a.o[N - 1]);
    const acc_t entropy = lse_h - a.o[N - 1].d / a.o[N - 1].l;
    loss -= entropy_weight * entropy;
    aux0 = lse_h;
    aux1 = entropy;
  } else if constexpr (LOSS == kHTA) {
    const acc_t kl_r = a.o[1].d / a.o[1].l - lse_s + lse_u;
    const int32_t* hta = hta_keys + (tt * B + b) * kHtaNum;
    const int64_t cross = hta[kIdxCross], top = hta[kIdxTop];
    const bool all_head = cross >= C;  // no crossing: every class is head (kd_cpu.cpp)
    const int64_t key_cross = all_head ? 0 : sort_key(u[cross * us.c]);
    Gaps g{{acc_t(0), acc_t(0)}};  // (gap_head, gap_all)
    const auto add_gap = [&](int64_t c, u_t z, s_t s_value) {
      const acc_t p = exp(to_acc<acc_t>(z) * inv_tau - lse_u);
      const acc_t gap = fabs(p - exp(to_acc<acc_t>(s_value) * inv_tau - lse_s));
      const int64_t key = sort_key(z);
      const bool head = all_head || key > key_cross || (key == key_cross && c < cross) || c == top;
      g.v[1] += gap;
      if (head) g.v[0] += gap;
    };
    if constexpr (VEC == 1) {
      for_each_class<kPairChunk>(u, us.c, s, ss.c, C, add_gap);
    } else {
      for_each_pack<VEC>(u, s, C, [&](int64_t c0, const Pack<u_t, VEC>& u_pack, const Pack<s_t, VEC>& s_pack) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) add_gap(c0 + i, u_pack.v[i], s_pack.v[i]);
      });
    }
    g = block_all_reduce(g, SumNOp(), gap_temp, gap_slot);
    const acc_t w_head = g.v[1] > acc_t(0) ? g.v[0] / g.v[1] : acc_t(0.5);
    loss = tau_sq * (w_head * kl_f + (acc_t(1) - w_head) * kl_r);
    aux0 = w_head;
    aux1 = kl_r;
  }
  if (tid == 0) {
    rows[row] = loss;
    acc_t* stat = stats + row * kNumStats;
    stat[kLseS] = lse_s;
    stat[kLseU] = lse_u;
    stat[kKlF] = kl_f;
    stat[kAux0] = aux0;
    stat[kAux1] = aux1;
  }
  if constexpr (WITH_GRAD) {
    const RowStats<acc_t> r{lse_s, lse_u, kl_f, aux0, aux1};
    s_t* g = grad_s + row * C;
    const auto grad_of = [&](s_t s_value, u_t u_value) {
      return from_acc<s_t>(grad_weight * grad_student<acc_t>(LOSS, to_acc<acc_t>(s_value), to_acc<acc_t>(u_value), r,
                                                             inv_tau, tau, inv_tau_h, entropy_weight));
    };
    if constexpr (VEC == 1) {
      for_each_class<kPairChunk>(s, ss.c, u, us.c, C, [&](int64_t c, s_t s_value, u_t u_value) {
        g[c] = grad_of(s_value, u_value);
      });
    } else {
      for_each_pack<VEC>(s, u, C, [&](int64_t c0, const Pack<s_t, VEC>& s_pack, const Pack<u_t, VEC>& u_pack) {
        Pack<s_t, VEC> g_pack;
#pragma unroll
        for (int i = 0; i < VEC; ++i) g_pack.v[i] = grad_of(s_pack.v[i], u_pack.v[i]);
        store_pack<s_t, VEC>(g + c0, g_pack);
      });
    }
  }
}

template <typename s_t, typename u_t, int LOSS, int VEC = 1>
__global__ void __launch_bounds__(kThreads)
    kd_forward_kernel(const s_t* __restrict__ S, Strides ss, const u_t* __restrict__ U, Strides us, bool teacher_per_t,
                      int64_t B, int64_t C, acc_type_t<s_t, u_t> inv_tau, acc_type_t<s_t, u_t> inv_tau_h,
                      acc_type_t<s_t, u_t> tau_sq, acc_type_t<s_t, u_t> entropy_weight,
                      const int32_t* __restrict__ hta_keys, acc_type_t<s_t, u_t>* __restrict__ rows,
                      acc_type_t<s_t, u_t>* __restrict__ stats) {
  using acc_t = acc_type_t<s_t, u_t>;
  kd_forward_row<s_t, u_t, LOSS, VEC, false>(S, ss, U, us, teacher_per_t, B, C, inv_tau, inv_tau_h, tau_sq,
                                             entropy_weight, hta_keys, rows, stats, acc_t(0), acc_t(0), nullptr);
}

// kd_forward_kernel that also writes the student's gradient [T, B, C] (contiguous) at a row gradient of
// grad_weight (kd_forward_row's WITH_GRAD); tau: the temperature (kd_backward_kernel's).
template <typename s_t, typename u_t, int LOSS, int VEC = 1>
__global__ void __launch_bounds__(kThreads)
    kd_forward_student_grad_kernel(const s_t* __restrict__ S, Strides ss, const u_t* __restrict__ U, Strides us,
                                   bool teacher_per_t, int64_t B, int64_t C, acc_type_t<s_t, u_t> inv_tau,
                                   acc_type_t<s_t, u_t> inv_tau_h, acc_type_t<s_t, u_t> tau_sq,
                                   acc_type_t<s_t, u_t> entropy_weight, const int32_t* __restrict__ hta_keys,
                                   acc_type_t<s_t, u_t>* __restrict__ rows, acc_type_t<s_t, u_t>* __restrict__ stats,
                                   acc_type_t<s_t, u_t> tau, acc_type_t<s_t, u_t> grad_weight,
                                   s_t* __restrict__ grad_s) {
  kd_forward_row<s_t, u_t, LOSS, VEC, true>(S, ss, U, us, teacher_per_t, B, C, inv_tau, inv_tau_h, tau_sq,
                                            entropy_weight, hta_keys, rows, stats, tau, grad_weight, grad_s);
}

// grad *= *scale unless *scale is 1, read on the device (no host synchronisation): the backward's
// completion of the precomputed gradient when the loss's gradient is a scalar (kd_autograd.cpp). At
// 1 -- a loss backpropagated alone or as a term of a sum -- every block returns at once.
template <typename g_t, typename scale_t>
__global__ void __launch_bounds__(kThreads)
    scale_unless_one_kernel(g_t* __restrict__ grad, int64_t n, const scale_t* __restrict__ scale) {
  const scale_t factor = *scale;
  if (factor == scale_t(1)) return;
  using acc_t = typename std::conditional<std::is_same<g_t, double>::value, double, float>::type;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    grad[i] = from_acc<g_t>(to_acc<acc_t>(grad[i]) * static_cast<acc_t>(factor));
  }
}

// kd_backward_kernel's teacher gradients: none, one per (t, b, c), or one per (b, c) summed over t.
enum TeacherGradMode : int { kNoTeacherGrad = 0, kTeacherGradPerStep = 1, kTeacherGradSummed = 2 };

// Backward, one thread per (b, VEC adjacent classes) (grid ceil(B * C / VEC / kThreads)), looping
// over t: writes grad_student [T, B, C] and grad_teacher ([T, B, C], or [B, C] summed over t in
// registers), both contiguous; grad_u is null without a teacher gradient. kd_cpu.cpp's
// backward_kernel. VEC > 1 (kd_rows_pack, where kd_rows_packable holds: unit class strides,
// C and the row strides multiples of VEC, 16-byte aligned rows) reads VEC classes of s and u and
// writes VEC gradients with one access each, and loads the row's statistics once for VEC classes:
// the VEC = 1 kernel is bound by the instructions it issues per element (an H200 ran it no faster
// in bf16 than in fp32, benchmarks/GPU_NOTES.md, session 15). Each element's formula and the
// order of its teacher sum over t do not depend on VEC: the same bits either way.
template <typename s_t, typename u_t, int LOSS, int VEC = 1>
__global__ void __launch_bounds__(kThreads)
    kd_backward_kernel(const acc_type_t<s_t, u_t>* __restrict__ grad_rows, const s_t* __restrict__ S, Strides ss,
                       const u_t* __restrict__ U, Strides us, bool teacher_per_t, int64_t T, int64_t B, int64_t C,
                       const acc_type_t<s_t, u_t>* __restrict__ stats, acc_type_t<s_t, u_t> inv_tau,
                       acc_type_t<s_t, u_t> tau, acc_type_t<s_t, u_t> inv_tau_h,
                       acc_type_t<s_t, u_t> entropy_weight, s_t* __restrict__ grad_s, u_t* __restrict__ grad_u) {
  using acc_t = acc_type_t<s_t, u_t>;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t packs_per_row = C / VEC;  // C % VEC == 0 (kd_rows_packable)
  if (n >= B * packs_per_row) return;
  const int64_t b = n / packs_per_row, c = (n - b * packs_per_row) * VEC;
  const s_t* s = S + b * ss.b + c * ss.c;  // ss.c == us.c == 1 when VEC > 1
  const u_t* u = U + b * us.b + c * us.c;
  // One loop per teacher-gradient mode -- none, per t, summed over t in registers --, chosen once:
  // left to itself the compiler keeps the mode's tests inside the unrolled VEC-wide loop.
  const auto sweep = [&](auto teacher_mode) {
    constexpr int MODE = decltype(teacher_mode)::value;
    acc_t teacher_sum[VEC] = {};
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = t * B + b;
      const acc_t* stat = stats + row * kNumStats;
      const RowStats<acc_t> r{stat[kLseS], stat[kLseU], stat[kKlF], stat[kAux0], stat[kAux1]};
      const acc_t g_row = grad_rows[row];
      Pack<s_t, VEC> zs_pack;
      Pack<u_t, VEC> zu_pack;
      if constexpr (VEC == 1) {
        zs_pack.v[0] = s[t * ss.t];
        zu_pack.v[0] = u[t * us.t];
      } else {
        zs_pack = load_pack<s_t, VEC>(s + t * ss.t);
        zu_pack = load_pack<u_t, VEC>(u + t * us.t);
      }
      Pack<s_t, VEC> gs_pack;
      Pack<u_t, VEC> gu_pack;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const acc_t zs = to_acc<acc_t>(zs_pack.v[i]), zu = to_acc<acc_t>(zu_pack.v[i]);
        gs_pack.v[i] =
            from_acc<s_t>(g_row * grad_student<acc_t>(LOSS, zs, zu, r, inv_tau, tau, inv_tau_h, entropy_weight));
        if constexpr (MODE != kNoTeacherGrad) {
          const acc_t gu = g_row * grad_teacher<acc_t>(LOSS, zs, zu, r, inv_tau, tau);
          if constexpr (MODE == kTeacherGradPerStep) {
            gu_pack.v[i] = from_acc<u_t>(gu);
          } else {
            teacher_sum[i] += gu;
          }
        }
      }
      store_pack<s_t, VEC>(grad_s + row * C + c, gs_pack);
      if constexpr (MODE == kTeacherGradPerStep) store_pack<u_t, VEC>(grad_u + row * C + c, gu_pack);
    }
    if constexpr (MODE == kTeacherGradSummed) {
      Pack<u_t, VEC> sum_pack;
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum_pack.v[i] = from_acc<u_t>(teacher_sum[i]);
      store_pack<u_t, VEC>(grad_u + b * C + c, sum_pack);
    }
  };
  if (!grad_u) {
    sweep(std::integral_constant<int, kNoTeacherGrad>{});
  } else if (teacher_per_t) {
    sweep(std::integral_constant<int, kTeacherGradPerStep>{});
  } else {
    sweep(std::integral_constant<int, kTeacherGradSummed>{});
  }
}

// ------------------------------------------------------------------------------------------------
// NLD (nld_cpu.cpp; the formulas are in snnkd_fast/kd/nld_triton.py's docstring)
// ------------------------------------------------------------------------------------------------

// log(e^a + e^b) = m + log(1 + e^{lo - m}), m the larger: the larger term's exp is exp(0) = 1, so one
// exp per call instead of two and the same sum, bit for bit, for every argument but +inf (the
// kernels' are differences with a log-sum-exp, NaN where a logit is +inf). NaN stays NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t logaddexp(acc_t a, acc_t b) {
  const acc_t m = a > b ? a : b, lo = a > b ? b : a;
  if (m == -INFINITY) return m;
  return m + log(acc_t(1) + exp(lo - m));
}

__device__ __forceinline__ uint64_t load_seed(const int64_t* seed) { return static_cast<uint64_t>(*seed); }

template <typename acc_t>
struct NldPass1 {
  Online<acc_t> p, q;  // LSE of the teacher logits and of the (noisy, with additive) student logits / tau
  acc_t sum_z;
};
struct NldPass1Merge {
  template <typename acc_t>
  __device__ __forceinline__ NldPass1<acc_t> operator()(const NldPass1<acc_t>& a, const NldPass1<acc_t>& b) const {
    return NldPass1<acc_t>{online_merge(a.p, b.p), online_merge(a.q, b.q), a.sum_z + b.sum_z};
  }
};

// NLD visits a row's classes by quads, 4q .. 4q+3 (q = tid, tid + kThreads, ...): the four share one
// Philox draw (nld_eps: component c mod 4 of the draw at quad_base + c / 4), so a quad costs one
// draw and two Box-Muller pairs where a class at a time cost four and four -- the noise, not the
// memory, bounded these kernels. A quad's values are loaded before its draw is computed.
__host__ __device__ constexpr int64_t nld_quads(int64_t C) { return (C + 3) / 4; }

template <typename T>
__device__ __forceinline__ void load_quad(const T* __restrict__ row, int64_t stride, int64_t c0, int64_t C, T out[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) out[j] = c0 + j < C ? row[(c0 + j) * stride] : T();
}

// f(c, student value, teacher value, eps) over a row's classes by quads, in this thread's order; eps
// is 0 unless `draw` (block-uniform: pass 1 of an additive-noise row needs it, a mixture's does not).
template <typename s_t, typename u_t, typename F>
__device__ __forceinline__ void for_each_quad(const s_t* __restrict__ s, int64_t s_stride, const u_t* __restrict__ u,
                                              int64_t u_stride, int64_t C, uint64_t seed, uint64_t quad_base,
                                              bool draw, F&& f) {
  for (int64_t q = threadIdx.x; q < nld_quads(C); q += kThreads) {
    const int64_t c0 = 4 * q;
    s_t sq[4];
    u_t uq[4];
    load_quad(s, s_stride, c0, C, sq);
    load_quad(u, u_stride, c0, C, uq);
    float eps[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (draw) philox_randn4x(seed, quad_base + static_cast<uint64_t>(q), eps);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (c0 + j < C) f(c0 + j, sq[j], uq[j], eps[j]);
    }
  }
}

// One class's terms of the mixture's row sums (sum w q A, sum (1-w) r A, sum (1-w) r A eps,
// sum r eps; A = p_t / p_s), added to acc: nld_row_sums_kernel's, and the forward's that forms the
// gradient (the same expressions, so the same bits).
template <typename s_t, typename u_t, typename acc_t>
__device__ __forceinline__ void nld_add_row_sums(SumN<acc_t, kNldSums>& acc, s_t zs, u_t zu, acc_t e,
                                                 const NldParams<acc_t>& P, acc_t mean, acc_t scale, acc_t lse_q,
                                                 acc_t lse_r, acc_t lse_p) {
  const acc_t log_q = to_acc<acc_t>(zs) * P.inv_tau - lse_q;
  const acc_t log_r = (mean + e * scale) * P.inv_tau - lse_r;
  const acc_t log_a = to_acc<acc_t>(zu) * P.inv_tau - lse_p - logaddexp(P.log_w + log_q, P.log_1mw + log_r);
  const acc_t mra = exp(P.log_1mw + log_r + log_a);
  acc.v[0] += exp(P.log_w + log_q + log_a);
  acc.v[1] += mra;
  acc.v[2] += mra * e;
  acc.v[3] += exp(log_r) * e;
}

// One class's student gradient at a row gradient of 1 (g_s), with the teacher's log-probability and
// probability and the student's smoothed log-probability log p_s, which the teacher gradient uses:
// nld_backward_kernel's terms, and the forward's that forms the gradient. sum: the row's sums
// (nld_add_row_sums; unused, may be null, in additive mode).
template <typename acc_t>
struct NldElementGrad {
  acc_t g_s, log_p, p, log_ps;
};
template <typename s_t, typename u_t, typename acc_t>
__device__ __forceinline__ NldElementGrad<acc_t> nld_element_grad(s_t zs, u_t zu, acc_t e, const NldParams<acc_t>& P,
                                                                  acc_t mean, acc_t scale, acc_t lse_q, acc_t lse_r,
                                                                  acc_t lse_p, const acc_t* sum, acc_t var_coef) {
  const acc_t z = to_acc<acc_t>(zs);
  NldElementGrad<acc_t> r;
  r.log_p = to_acc<acc_t>(zu) * P.inv_tau - lse_p;
  r.p = exp(r.log_p);
  if (P.additive) {
    r.log_ps = (z + P.noise_std * e) * P.inv_tau - lse_q;
    r.g_s = P.tau * (exp(r.log_ps) - r.p);
  } else {
    const acc_t log_q = z * P.inv_tau - lse_q;
    r.log_ps = logaddexp(P.log_w + log_q, P.log_1mw + (mean + e * scale) * P.inv_tau - lse_r);
    r.g_s = -P.tau * (exp(P.log_w + log_q + r.log_p - r.log_ps) - exp(log_q) * sum[0]);  // -w tau q (A - sum q A)
    if (P.adaptive) {
      const acc_t sum_g_eps = -P.tau * (sum[2] - sum[1] * sum[3]);
      r.g_s += var_coef * sum_g_eps * (z - mean);
    }
  }
  return r;
}

// Blocks per multiprocessor the NLD row kernels ask ptxas to fit (__launch_bounds__' second argument),
// for float accumulation; double accumulation asks for none (held to the same registers it spills).
// Without it, the exact sincospif of the noise (philox.h) took the forward from 64 to 80 registers and
// the row sums from 48 to 74 (4 -> 3 and 5 -> 3 blocks of 256 threads per SM); held to 64 and 48 they
// do not spill (ptxas, sm_90).
template <typename acc_t>
constexpr int nld_min_blocks(int for_float) {
  return std::is_same<acc_t, double>::value ? 1 : for_float;
}

// Forward, one block per row r = t * B + b (grid T * B), passes as nld_cpu.cpp: (1) sum of z, LSE of
// the teacher and of the student logits (noisy ones with `additive`); (2) adaptive: the unbiased
// variance about the mean; (3) mixture: LSE of the noise logits; (4) the KL. rows [T, B], stats
// [T, B, kNldStats]. eps = nld_eps(seed, nld_row_counter(r, C), c), drawn again in each pass.
//
// WITH_GRAD (nld_forward_student_grad_kernel; the eager autograd kernel's precomputed gradient,
// csrc/kd/kd_autograd.cpp): the mixture's row sums (nld_row_sums_kernel's terms, in its order) are
// formed in pass (4) too, and a pass (5) draws the noise once more and writes the row's student
// gradient at a row gradient of grad_weight (nld_backward_kernel's terms): bit for bit what the row
// sums and backward kernels give at grad_rows = grad_weight, with one draw of the noise fewer and
// one launch where they took two.
template <typename s_t, typename u_t, bool WITH_GRAD>
__device__ __forceinline__ void nld_forward_row(const s_t* __restrict__ S, Strides ss, const u_t* __restrict__ U,
                                                Strides us, int64_t B, int64_t C, const int64_t* __restrict__ seed_ptr,
                                                const NldParams<acc_type_t<s_t, u_t>>& P, acc_type_t<s_t, u_t> tau_sq,
                                                acc_type_t<s_t, u_t>* __restrict__ rows,
                                                acc_type_t<s_t, u_t>* __restrict__ stats,
                                                acc_type_t<s_t, u_t> grad_weight, s_t* __restrict__ grad_s) {
  using acc_t = acc_type_t<s_t, u_t>;
  __shared__ typename cub::BlockReduce<NldPass1<acc_t>, kThreads>::TempStorage pass1_temp;
  __shared__ NldPass1<acc_t> pass1_slot;
  __shared__ typename cub::BlockReduce<Online<acc_t>, kThreads>::TempStorage lse_temp;
  __shared__ Online<acc_t> lse_slot;
  __shared__ typename cub::BlockReduce<acc_t, kThreads>::TempStorage sum_temp;
  __shared__ acc_t sum_slot;

  const int64_t r = blockIdx.x;
  const int64_t t = r / B, b = r % B;
  const s_t* s = S + t * ss.t + b * ss.b;
  const u_t* u = U + t * us.t + b * us.b;
  const uint64_t seed = load_seed(seed_ptr);
  const uint64_t quad_base = nld_row_counter(r, C);
  const int tid = threadIdx.x;

  NldPass1<acc_t> a{online_init<acc_t>(), online_init<acc_t>(), acc_t(0)};
  for_each_quad(s, ss.c, u, us.c, C, seed, quad_base, P.additive, [&](int64_t, s_t zs, u_t zu, float eps) {
    const acc_t z = to_acc<acc_t>(zs);
    a.sum_z += z;
    online_push<false>(a.p, to_acc<acc_t>(zu) * P.inv_tau, acc_t(0));
    const acc_t x = P.additive ? (z + P.noise_std * static_cast<acc_t>(eps)) * P.inv_tau : z * P.inv_tau;
    online_push<false>(a.q, x, acc_t(0));
  });
  a = block_all_reduce(a, NldPass1Merge(), pass1_temp, pass1_slot);
  const acc_t lse_p = online_lse(a.p), lse_q = online_lse(a.q);
  const acc_t mean = a.sum_z / static_cast<acc_t>(C);

  acc_t scale = P.noise_std;
  if (P.adaptive) {
    acc_t m2 = acc_t(0);
    for_each_class<kTeacherChunk>(s, ss.c, C, [&](int64_t, s_t z) {
      const acc_t dz = to_acc<acc_t>(z) - mean;
      m2 += dz * dz;
    });
    m2 = block_all_reduce(m2, SumOp(), sum_temp, sum_slot);
    scale = C > 1 ? m2 / static_cast<acc_t>(C - 1) : acc_t(0);
  }
  acc_t lse_r = acc_t(0);
  if (!P.additive) {
    Online<acc_t> o = online_init<acc_t>();
    for (int64_t q = tid; q < nld_quads(C); q += kThreads) {
      float eps[4];
      philox_randn4x(seed, quad_base + static_cast<uint64_t>(q), eps);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (4 * q + j < C) online_push<false>(o, (mean + static_cast<acc_t>(eps[j]) * scale) * P.inv_tau, acc_t(0));
      }
    }
    o = block_all_reduce(o, OnlineMerge(), lse_temp, lse_slot);
    lse_r = online_lse(o);
  }
  acc_t kl = acc_t(0);
  using Sums = SumN<acc_t, kNldSums>;
  Sums row_sums{{acc_t(0), acc_t(0), acc_t(0), acc_t(0)}};  // WITH_GRAD, mixture: nld_row_sums_kernel's
  for_each_quad(s, ss.c, u, us.c, C, seed, quad_base, true, [&](int64_t, s_t zs, u_t zu, float eps) {
    const acc_t z = to_acc<acc_t>(zs);
    const acc_t log_p = to_acc<acc_t>(zu) * P.inv_tau - lse_p;
    const acc_t e = static_cast<acc_t>(eps);
    const acc_t log_ps = P.additive ? (z + P.noise_std * e) * P.inv_tau - lse_q
                                    : logaddexp(P.log_w + z * P.inv_tau - lse_q,
                                                P.log_1mw + (mean + e * scale) * P.inv_tau - lse_r);
    const acc_t p = exp(log_p);
    if (p != acc_t(0)) kl += p * (log_p - log_ps);  // != 0: a NaN p (NaN/+inf logit) makes the row NaN
    if constexpr (WITH_GRAD) {
      if (!P.additive) nld_add_row_sums(row_sums, zs, zu, e, P, mean, scale, lse_q, lse_r, lse_p);
    }
  });
  kl = block_all_reduce(kl, SumOp(), sum_temp, sum_slot);
  if (tid == 0) {
    rows[r] = tau_sq * kl;
    acc_t* stat = stats + r * kNldStats;
    stat[0] = mean;
    stat[1] = scale;
    stat[2] = lse_q;
    stat[3] = lse_r;
    stat[4] = lse_p;
    stat[5] = kl;
  }
  if constexpr (WITH_GRAD) {
    __shared__ typename cub::BlockReduce<Sums, kThreads>::TempStorage sums_temp;
    __shared__ Sums sums_slot;
    if (!P.additive) row_sums = block_all_reduce(row_sums, SumNOp(), sums_temp, sums_slot);
    const acc_t var_coef = C > 1 ? acc_t(2) / static_cast<acc_t>(C - 1) : acc_t(0);
    s_t* g = grad_s + r * C;
    for_each_quad(s, ss.c, u, us.c, C, seed, quad_base, true, [&](int64_t c, s_t zs, u_t zu, float eps) {
      const acc_t g_s = nld_element_grad(zs, zu, static_cast<acc_t>(eps), P, mean, scale, lse_q, lse_r, lse_p,
                                         row_sums.v, var_coef).g_s;
      g[c] = from_acc<s_t>(g_s * grad_weight);
    });
  }
}

template <typename s_t, typename u_t>
__global__ void __launch_bounds__(kThreads, nld_min_blocks<acc_type_t<s_t, u_t>>(4))
    nld_forward_kernel(const s_t* __restrict__ S, Strides ss, const u_t* __restrict__ U, Strides us, int64_t B,
                       int64_t C, const int64_t* __restrict__ seed_ptr, NldParams<acc_type_t<s_t, u_t>> P,
                       acc_type_t<s_t, u_t> tau_sq, acc_type_t<s_t, u_t>* __restrict__ rows,
                       acc_type_t<s_t, u_t>* __restrict__ stats) {
  nld_forward_row<s_t, u_t, false>(S, ss, U, us, B, C, seed_ptr, P, tau_sq, rows, stats, acc_type_t<s_t, u_t>(0),
                                   nullptr);
}

// nld_forward_kernel that also writes the student's gradient [T, B, C] (contiguous) at a row gradient
// of grad_weight (nld_forward_row's WITH_GRAD).
template <typename s_t, typename u_t>
__global__ void __launch_bounds__(kThreads)
    nld_forward_student_grad_kernel(const s_t* __restrict__ S, Strides ss, const u_t* __restrict__ U, Strides us,
                                    int64_t B, int64_t C, const int64_t* __restrict__ seed_ptr,
                                    NldParams<acc_type_t<s_t, u_t>> P, acc_type_t<s_t, u_t> tau_sq,
                                    acc_type_t<s_t, u_t>* __restrict__ rows, acc_type_t<s_t, u_t>* __restrict__ stats,
                                    acc_type_t<s_t, u_t> grad_weight, s_t* __restrict__ grad_s) {
  nld_forward_row<s_t, u_t, true>(S, ss, U, us, B, C, seed_ptr, P, tau_sq, rows, stats, grad_weight, grad_s);
}

// Backward, step 1 (mixture mode only), one block per row: the row sums the gradient needs,
// sums [T, B, kNldSums] = (sum w q A, sum (1-w) r A, sum (1-w) r A eps, sum r eps) with A = p_t / p_s,
// the weighted products formed in the log domain (each is at most p_t; q * exp(log A) would be
// 0 * inf = NaN once q underflows).
template <typename s_t, typename u_t>
__global__ void __launch_bounds__(kThreads, nld_min_blocks<acc_type_t<s_t, u_t>>(5))
    nld_row_sums_kernel(const s_t* __restrict__ S, Strides ss, const u_t* __restrict__ U, Strides us, int64_t B,
                        int64_t C, const int64_t* __restrict__ seed_ptr, NldParams<acc_type_t<s_t, u_t>> P,
                        const acc_type_t<s_t, u_t>* __restrict__ stats, acc_type_t<s_t, u_t>* __restrict__ sums) {
  using acc_t = acc_type_t<s_t, u_t>;
  using Sums = SumN<acc_t, kNldSums>;
  __shared__ typename cub::BlockReduce<Sums, kThreads>::TempStorage temp;

  const int64_t r = blockIdx.x;
  const int64_t t = r / B, b = r % B;
  const s_t* s = S + t * ss.t + b * ss.b;
  const u_t* u = U + t * us.t + b * us.b;
  const uint64_t seed = load_seed(seed_ptr);
  const uint64_t quad_base = nld_row_counter(r, C);
  const acc_t* stat = stats + r * kNldStats;
  const acc_t mean = stat[0], scale = stat[1], lse_q = stat[2], lse_r = stat[3], lse_p = stat[4];

  Sums acc{{acc_t(0), acc_t(0), acc_t(0), acc_t(0)}};
  for_each_quad(s, ss.c, u, us.c, C, seed, quad_base, true, [&](int64_t, s_t zs, u_t zu, float eps) {
    nld_add_row_sums(acc, zs, zu, static_cast<acc_t>(eps), P, mean, scale, lse_q, lse_r, lse_p);
  });
  acc = cub::BlockReduce<Sums, kThreads>(temp).Reduce(acc, SumNOp());
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kNldSums; ++k) sums[r * kNldSums + k] = acc.v[k];
  }
}

// Backward, step 2, one thread per (b, quad of classes) looping over t (grid ceil(B * nld_quads(C) /
// kThreads)): one draw per quad and step. grad_student [T, B, C] and grad_teacher ([T, B, C], or
// [B, C] summed over t in registers), contiguous; grad_u null without a teacher gradient; sums null
// in additive mode.
template <typename s_t, typename u_t>
__global__ void __launch_bounds__(kThreads)
    nld_backward_kernel(const acc_type_t<s_t, u_t>* __restrict__ grad_rows, const s_t* __restrict__ S, Strides ss,
                        const u_t* __restrict__ U, Strides us, bool teacher_per_t, int64_t T, int64_t B, int64_t C,
                        const int64_t* __restrict__ seed_ptr, NldParams<acc_type_t<s_t, u_t>> P,
                        const acc_type_t<s_t, u_t>* __restrict__ stats, const acc_type_t<s_t, u_t>* __restrict__ sums,
                        s_t* __restrict__ grad_s, u_t* __restrict__ grad_u) {
  using acc_t = acc_type_t<s_t, u_t>;
  const int64_t quads = nld_quads(C);
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= B * quads) return;
  const int64_t b = n / quads, q = n - b * quads, c0 = 4 * q;
  const s_t* s = S + b * ss.b;
  const u_t* u = U + b * us.b;
  const uint64_t seed = load_seed(seed_ptr);
  const acc_t var_coef = C > 1 ? acc_t(2) / static_cast<acc_t>(C - 1) : acc_t(0);
  acc_t teacher_sum[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t t = 0; t < T; ++t) {
    const int64_t r = t * B + b;
    s_t sq[4];
    u_t uq[4];
    load_quad(s + t * ss.t, ss.c, c0, C, sq);
    load_quad(u + t * us.t, us.c, c0, C, uq);
    const acc_t* stat = stats + r * kNldStats;
    const acc_t mean = stat[0], scale = stat[1], lse_q = stat[2], lse_r = stat[3], lse_p = stat[4], kl = stat[5];
    const acc_t g_row = grad_rows[r];
    float eps[4];
    philox_randn4x(seed, nld_row_counter(r, C) + static_cast<uint64_t>(q), eps);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + j;
      if (c >= C) break;
      const NldElementGrad<acc_t> el =
          nld_element_grad(sq[j], uq[j], static_cast<acc_t>(eps[j]), P, mean, scale, lse_q, lse_r, lse_p,
                           P.additive ? static_cast<const acc_t*>(nullptr) : sums + r * kNldSums, var_coef);
      grad_s[r * C + c] = from_acc<s_t>(el.g_s * g_row);
      if (grad_u) {
        const acc_t g_u = el.p > acc_t(0) ? P.tau * g_row * el.p * (el.log_p - el.log_ps - kl) : acc_t(0);
        if (teacher_per_t) {
          grad_u[r * C + c] = from_acc<u_t>(g_u);
        } else {
          teacher_sum[j] += g_u;
        }
      }
    }
  }
  if (grad_u && !teacher_per_t) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (c0 + j < C) grad_u[b * C + c0 + j] = from_acc<u_t>(teacher_sum[j]);
    }
  }
}

// The eps the NLD kernels draw for rows of C classes: out[i] = nld_eps(seed, nld_row_counter(i / C, C),
// i mod C), grid-stride over n. (A template, out_t = float, so that two translation units including
// this header do not both define it.)
template <typename out_t>
__global__ void __launch_bounds__(kThreads)
    nld_noise_kernel(const int64_t* __restrict__ seed_ptr, out_t* __restrict__ out, int64_t n, int64_t C) {
  const uint64_t seed = load_seed(seed_ptr);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    out[i] = static_cast<out_t>(nld_eps(seed, nld_row_counter(i / C, C), i % C));
  }
}

}  // namespace cuda
}  // namespace kd
}  // namespace snnkd
