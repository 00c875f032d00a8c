// Host-side helpers of the CUDA KD-loss launchers (kd_cuda.cu, nld_cuda.cu): the device check and
// the grid sizes, checked against CUDA's grid limit.
#pragma once

#include <c10/util/Exception.h>
#include <torch/types.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>

#include "kd_cuda_kernels.cuh"

namespace snnkd {
namespace kd {
namespace cuda {

constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();

// Whether the environment sets `name` to anything but empty or "0" (the launchers' A/B switches,
// SNNKD_CUDA_KD_UNPACKED and SNNKD_CUDA_KD_NO_FORWARD_GRAD).
inline bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && std::string(value) != "0";
}

inline void check_same_device(const char* op, const at::Tensor& student,
                              std::initializer_list<const at::Tensor*> others) {
  TORCH_CHECK(student.is_cuda(), op, ": student must be a CUDA tensor");
  for (const at::Tensor* t : others) {
    TORCH_CHECK(t->device() == student.device(), op, ": every tensor must be on ", student.device(), ", got one on ",
                t->device());
  }
}

inline int64_t row_blocks(const char* op, int64_t rows) {
  TORCH_CHECK(rows <= kMaxGrid, op, ": too many rows (", rows, ") for one launch");
  return rows;
}

inline int64_t element_blocks(const char* op, int64_t elements) {
  const int64_t blocks = (elements + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= kMaxGrid, op, ": too many elements (", elements, ") for one launch");
  return blocks;
}

}  // namespace cuda
}  // namespace kd
}  // namespace snnkd
