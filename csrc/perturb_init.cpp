// perturb_init: argument checks, the CPU kernel and the dispatch to the CUDA launcher.
//
// noise [B, P, D] holds uniform(-1, 1) draws (made by the caller with torch's generator, so
// every backend gives the same result for the same seed); this scales them in place:
//   l2:   noise[b, p, :] *= mask[b, p] * init_mag / sqrt(len_b * D), len_b = sum_p mask[b, p]
//         (P without a mask); examples with len_b == 0 become zeros;
//   linf: noise[b, p, :] *= mask[b, p] * init_mag.
#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include "common.h"
#include "ops.h"

namespace villa_fast {
namespace {

template <typename T>
void init_cpu(T* noise, const T* mask, int64_t B, int64_t P, int64_t D, double init_mag, bool l2) {
    const T mag = static_cast<T>(init_mag);
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(P * D, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
            const T* m = mask != nullptr ? mask + b * P : nullptr;
            T base = mag;
            if (l2) {
                T len = static_cast<T>(P);
                if (m != nullptr) {
                    len = 0;
#pragma omp simd reduction(+ : len)
                    for (int64_t p = 0; p < P; ++p) len += m[p];
                }
                base = len > 0 ? mag / std::sqrt(len * static_cast<T>(D)) : T(0);
            }
            for (int64_t p = 0; p < P; ++p) {
                const T f = m != nullptr ? base * m[p] : base;
                T* row = noise + (b * P + p) * D;
#pragma omp simd
                for (int64_t i = 0; i < D; ++i) row[i] *= f;
            }
        }
    });
}

}  // namespace

at::Tensor perturb_init_(at::Tensor noise, c10::optional<at::Tensor> mask, double init_mag, int64_t norm_type) {
    TORCH_CHECK(noise.defined(), "perturb_init_: noise is undefined");
    check_device_supported(noise, "perturb_init_: noise");
    TORCH_CHECK(noise.dim() == 3, "perturb_init_: noise must have shape [B, P, D], got ", noise.sizes());
    TORCH_CHECK(noise.scalar_type() == at::kFloat || noise.scalar_type() == at::kDouble,
                "perturb_init_: noise must be float32 or float64, got ", noise.scalar_type());
    TORCH_CHECK(noise.is_contiguous(), "perturb_init_: noise must be contiguous");
    TORCH_CHECK(norm_type == 0 || norm_type == 1, "perturb_init_: norm_type must be 0 (l2) or 1 (linf), got ",
                norm_type);
    TORCH_CHECK(init_mag >= 0 && std::isfinite(init_mag), "perturb_init_: init_mag must be finite and >= 0, got ",
                init_mag);
    const int64_t B = noise.size(0), P = noise.size(1), D = noise.size(2);
    const bool has_mask = mask.has_value() && mask->defined();
    if (has_mask) {
        const at::Tensor& m = *mask;
        TORCH_CHECK(m.device() == noise.device(), "perturb_init_: mask is on ", m.device(), " but noise is on ",
                    noise.device());
        TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == P, "perturb_init_: mask must have shape [B, P] = [",
                    B, ", ", P, "] to match noise, got ", m.sizes());
        TORCH_CHECK(m.scalar_type() == noise.scalar_type(), "perturb_init_: mask must have the dtype of noise (",
                    noise.scalar_type(), "), got ", m.scalar_type());
        TORCH_CHECK(m.is_contiguous(), "perturb_init_: mask must be contiguous");
    }
#ifdef WITH_CUDA
    if (noise.is_cuda()) {
        const c10::cuda::CUDAGuard guard(noise.device());
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(noise.get_device()).stream();
        check_launch(launch_perturb_init(noise.data_ptr(), has_mask ? mask->data_ptr() : nullptr,
                                         launcher_dtype(noise.scalar_type()), B, P, D, init_mag,
                                         static_cast<int32_t>(norm_type), stream),
                     "perturb_init_");
        return noise;
    }
#endif
    // dtype dispatch: float32 or float64 (checked above)
    if (noise.scalar_type() == at::kDouble) {
        init_cpu(noise.data_ptr<double>(), has_mask ? mask->data_ptr<double>() : nullptr, B, P, D, init_mag,
                 norm_type == 0);
    } else {
        init_cpu(noise.data_ptr<float>(), has_mask ? mask->data_ptr<float>() : nullptr, B, P, D, init_mag,
                 norm_type == 0);
    }
    return noise;
}

}  // namespace villa_fast
