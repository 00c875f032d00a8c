// Host stand-in for cub::BlockReduce under csrc/tests/cuda_emulation/cuda_emulation.h: the threads
// of a block run one after another, so Sum adds each thread's value to the shared storage and the
// last caller (thread 0, which the emulated launch runs last) gets the block's total. The order of
// the additions is not cub's tree: results match a device run to rounding, not bit for bit.
#pragma once

namespace cub {

template <typename T, int THREADS>
class BlockReduce {
 public:
  struct TempStorage {
    T sum;
    int calls = 0;
  };
  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}
  T Sum(T value) {
    if (storage_.calls == 0) storage_.sum = T(0);
    storage_.sum += value;
    if (++storage_.calls == THREADS) storage_.calls = 0;
    return storage_.sum;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
