// Used only when compiling the .cu files against a CPU build of torch (the CMake compile check in
// CI): CPU wheels ship c10/cuda headers but not this header, which a CUDA build generates with
// exactly this content. A real CUDA build of torch provides its own and this folder is not used.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
