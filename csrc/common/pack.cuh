// Vector accesses of the CUDA kernels: VEC adjacent values of T read or written as one access (up to
// 16 bytes: LDG.E.128 / STG.E.128), where a scalar loop would issue VEC loads, VEC address
// computations and VEC stores. The caller guarantees the alignment, sizeof(T) * VEC bytes (the
// launchers check it and fall back to VEC = 1). Plain C++ under the CPU emulation of the kernels
// (csrc/tests/cuda_emulation/), which defines __device__ and __forceinline__ first.
#pragma once

#include <cstddef>
#include <cstdint>

namespace snnkd {

// Host side: whether ptr may carry packs of `bytes` (the launchers' check before VEC > 1).
inline bool pack_aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* ptr) {
  return *reinterpret_cast<const Pack<T, VEC>*>(ptr);
}
// Global memory only. On the device a 16- or 8-byte pack is stored with one st.global.v4 / .v2
// of its 32-bit words: NVVM splits a plain copy of the struct into one store per element and does
// not merge them back, even told the alignment (seen in the PTX of kd_backward_kernel: four
// st.global.f32 -- eight st.global.b16 for bf16 -- where the loads of the same packs were one
// ld.global.nc.v4), which costs the instructions the pack is there to save.
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* ptr, const Pack<T, VEC>& pack) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    unsigned w[4];
    memcpy(w, &pack, sizeof(w));
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                 : "memory");
    return;
  } else if constexpr (sizeof(Pack<T, VEC>) == 8) {
    unsigned w[2];
    memcpy(w, &pack, sizeof(w));
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(ptr), "r"(w[0]), "r"(w[1]) : "memory");
    return;
  }
#endif
  *reinterpret_cast<Pack<T, VEC>*>(ptr) = pack;
}

}  // namespace snnkd
