// Host stand-ins for cub::BlockReduce and cub::BlockScan under
// csrc/tests/cuda_emulation/cuda_emulation.h. Under launch_cooperative each thread leaves its value
// in the temporary storage and waits at a barrier, then folds the block's values in thread order
// (cub adds along a tree: results match a device run to rounding, not bit for bit). Under the
// sequential launch (no barriers) Reduce/Sum accumulate across the calls instead, and the last
// caller -- thread 0, which that launch runs last -- gets the block's total.
#pragma once

namespace cub {

template <typename T, int THREADS>
class BlockReduce {
 public:
  struct TempStorage {
    T values[THREADS];
    T total;
    int calls = 0;
  };
  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  template <typename Op>
  T Reduce(T value, Op op) {
    if (!cuda_emulation::cooperative()) {
      storage_.total = storage_.calls == 0 ? value : op(storage_.total, value);
      if (++storage_.calls == THREADS) storage_.calls = 0;
      return storage_.total;
    }
    storage_.values[threadIdx.x] = value;
    __syncthreads();
    T total = storage_.values[0];
    for (int i = 1; i < THREADS; ++i) total = op(total, storage_.values[i]);
    return total;
  }

  T Sum(T value) {
    return Reduce(value, [](const T& a, const T& b) { return a + b; });
  }

 private:
  TempStorage& storage_;
};

template <typename T, int THREADS>
class BlockScan {
 public:
  struct TempStorage {
    T values[THREADS];
  };
  explicit BlockScan(TempStorage& storage) : storage_(storage) {}

  void InclusiveSum(T input, T& inclusive, T& block_aggregate) {
    storage_.values[threadIdx.x] = input;
    __syncthreads();  // aborts outside launch_cooperative
    T running = T(0);
    for (int i = 0; i <= static_cast<int>(threadIdx.x); ++i) running = running + storage_.values[i];
    inclusive = running;
    for (int i = static_cast<int>(threadIdx.x) + 1; i < THREADS; ++i) running = running + storage_.values[i];
    block_aggregate = running;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
