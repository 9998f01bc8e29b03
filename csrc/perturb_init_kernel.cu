// CUDA kernel of perturb_init: scales uniform(-1, 1) noise [B, P, D] in place into the
// initial perturbation (l2: mask * init_mag / sqrt(len_b * D); linf: mask * init_mag).
//
// Grid (P chunks, B): each block sums its example's mask row itself (P values, L2-resident)
// rather than launching a separate kernel for the lengths, then scales whole rows of D
// elements with 16-byte accesses where alignment allows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace villa_fast {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int64_t kElemsPerBlock = 16384;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    perturb_init_kernel(T* __restrict__ noise, const T* __restrict__ mask, int64_t B, int64_t P, int64_t D,
                        T init_mag, bool l2, int64_t rows_per_block) {
    __shared__ T smem[32];
    constexpr int kVec = Pack16<T>::kSize;
    const bool vec = D % kVec == 0 && reinterpret_cast<uintptr_t>(noise) % 16 == 0;
    const int64_t p0 = int64_t(blockIdx.x) * rows_per_block;
    const int64_t p1 = p0 + rows_per_block < P ? p0 + rows_per_block : P;
    for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
        T base = init_mag;
        if (l2) {
            T len = T(P);
            if (mask != nullptr) {
                T v[1] = {T(0)};
                for (int64_t p = threadIdx.x; p < P; p += kThreads) v[0] += mask[b * P + p];
                block_sum(v, smem);
                len = v[0];
            }
            // an example with no valid position gets zeros, never 0 * inf
            base = len > T(0) ? init_mag / sqrt(len * T(D)) : T(0);
        }
        for (int64_t p = p0; p < p1; ++p) {
            const T f = mask != nullptr ? base * mask[b * P + p] : base;
            T* row = noise + (b * P + p) * D;
            if (vec) {
                Pack16<T>* rv = reinterpret_cast<Pack16<T>*>(row);
                for (int64_t i = threadIdx.x; i < D / kVec; i += kThreads) {
                    Pack16<T> x = rv[i];
#pragma unroll
                    for (int k = 0; k < kVec; ++k) x.v[k] *= f;
                    rv[i] = x;
                }
            } else {
                for (int64_t i = threadIdx.x; i < D; i += kThreads) row[i] *= f;
            }
        }
    }
}

template <typename T>
cudaError_t launch(T* noise, const T* mask, int64_t B, int64_t P, int64_t D, double init_mag, int32_t norm_type,
                   cudaStream_t stream) {
    if (B == 0 || P == 0 || D == 0) return cudaSuccess;
    const int64_t rows_per_block = D >= kElemsPerBlock ? 1 : kElemsPerBlock / D;
    const int64_t chunks = (P + rows_per_block - 1) / rows_per_block;
    if (chunks > 0x7fffffff) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(B < 65535 ? B : 65535));
    perturb_init_kernel<T><<<grid, kThreads, 0, stream>>>(noise, mask, B, P, D, static_cast<T>(init_mag),
                                                         norm_type == 0, rows_per_block);
    return cudaGetLastError();
}

}  // namespace

cudaError_t launch_perturb_init(void* noise, const void* mask, DType dtype, int64_t B, int64_t P, int64_t D,
                                double init_mag, int32_t norm_type, cudaStream_t stream) {
    switch (dtype) {
        case DType::kFloat32:
            return launch(static_cast<float*>(noise), static_cast<const float*>(mask), B, P, D, init_mag, norm_type,
                          stream);
        case DType::kFloat64:
            return launch(static_cast<double*>(noise), static_cast<const double*>(mask), B, P, D, init_mag,
                          norm_type, stream);
        default:
            return cudaErrorInvalidValue;
    }
}

}  // namespace villa_fast
