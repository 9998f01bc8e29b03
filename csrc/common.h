// Small helpers shared by the op sources (ATen headers only, so each .cpp stays quick to build).
#pragma once

#include <ATen/ATen.h>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"
#endif

namespace villa_fast {

// Float types of ATen accumulate in float, double in double.
template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline void check_device_supported(const at::Tensor& t, const char* name) {
#ifdef WITH_CUDA
    TORCH_CHECK(t.is_cpu() || t.is_cuda(), name, " must be a CPU or CUDA tensor, got device ", t.device());
#else
    TORCH_CHECK(t.is_cpu(), name, " is on ", t.device(),
                " but villa_fast._C was built without CUDA kernels: only CPU tensors are supported");
#endif
}

#ifdef WITH_CUDA
inline DType launcher_dtype(at::ScalarType t) {
    switch (t) {
        case at::kFloat:
            return DType::kFloat32;
        case at::kHalf:
            return DType::kFloat16;
        case at::kBFloat16:
            return DType::kBFloat16;
        case at::kDouble:
            return DType::kFloat64;
        default:
            TORCH_CHECK(false, "villa_fast: no CUDA kernel for dtype ", t);
    }
}

inline void check_launch(cudaError_t err, const char* op) {
    TORCH_CHECK(err == cudaSuccess, "villa_fast.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace villa_fast
