// CUDA kernels of sym_kl_fwd: symmetric KL between softmax(a) and softmax(b) per row of
// [N, C], its value and both gradients (one read of each row on chip, three for longer rows).
//
// With p = softmax(a), q = softmax(b), d = log p - log q, Ep = sum p d, Eq = sum q d:
//   L_row = Ep - Eq,  dL/da = p (d - Ep) + p - q,  dL/db = q (Eq - d) + q - p.
// Rows that fit on chip are read once into registers (a warp per row for C <= 256, a block
// per row up to 8192) and each gradient written once. Longer rows take three reads: an online
// max / sum-exp, the sums of Ep, Eq and the loss from d formed per element, and the gradients
// (the later reads mostly from L2). Per-row losses go
// to a buffer reduced by one small block in a fixed order: no float atomics, so the loss is
// bit-reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace villa_fast {
namespace {

using namespace cuda_detail;

constexpr float kNegInf = -__builtin_huge_valf();

constexpr int kWarpItems = 8;     // warp per row: C <= 256
constexpr int kBlockThreads = 512;
constexpr int kBlockItems = 16;   // block per row: C <= 8192
constexpr int kWarpRowsPerBlock = 8;

// Reduction over the threads that share a row: one warp, or the whole block.
template <int kGroup, int N>
__device__ __forceinline__ void group_sum(float (&v)[N], float* smem) {
    if constexpr (kGroup == 32) {
        warp_sum(v);
    } else {
        block_sum(v, smem);
    }
}

template <int kGroup, int N>
__device__ __forceinline__ void group_max(float (&v)[N], float* smem) {
    if constexpr (kGroup == 32) {
        warp_max(v);
    } else {
        block_max(v, smem);
    }
}

// d = log p - log q, with 0 where both logits are -inf (lp == lq covers it: -inf == -inf).
__device__ __forceinline__ float log_ratio(float lp, float lq) { return lp == lq ? 0.f : lp - lq; }

// One row per group of kGroup threads, held in registers (kItems elements per thread).
template <typename T, int kGroup, int kItems>
__global__ void __launch_bounds__(kGroup == 32 ? 32 * kWarpRowsPerBlock : kGroup)
    sym_kl_on_chip_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ ga,
                          T* __restrict__ gb, float* __restrict__ row_loss, int64_t N, int C, float f) {
    __shared__ float smem[3 * 32];
    constexpr int kRowsPerBlock = kGroup == 32 ? kWarpRowsPerBlock : 1;
    const int lane = threadIdx.x % kGroup;
    for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kGroup; row < N;
         row += int64_t(gridDim.x) * kRowsPerBlock) {
        const T* ar = a + row * C;
        const T* br = b + row * C;
        float x[kItems], y[kItems];
        float m[2] = {kNegInf, kNegInf};
#pragma unroll
        for (int k = 0; k < kItems; ++k) {
            const int c = k * kGroup + lane;
            // padding acts as a class masked on both sides: it contributes nothing
            x[k] = c < C ? to_float(ar[c]) : kNegInf;
            y[k] = c < C ? to_float(br[c]) : kNegInf;
            m[0] = fmaxf(m[0], x[k]);
            m[1] = fmaxf(m[1], y[k]);
        }
        group_max<kGroup>(m, smem);
        float p[kItems], q[kItems];
        float s[2] = {0.f, 0.f};
#pragma unroll
        for (int k = 0; k < kItems; ++k) {
            p[k] = __expf(x[k] - m[0]);
            q[k] = __expf(y[k] - m[1]);
            s[0] += p[k];
            s[1] += q[k];
        }
        group_sum<kGroup>(s, smem);
        const float lse_a = m[0] + __logf(s[0]);
        const float lse_b = m[1] + __logf(s[1]);
        const float inv_a = 1.f / s[0], inv_b = 1.f / s[1];
        // e = (Ep, Eq, loss); the loss is summed as (p - q) d rather than Ep - Eq so that a class
        // that is -inf on one side only gives +inf (as on the CPU) instead of 0 * -inf = NaN
        float e[3] = {0.f, 0.f, 0.f};
#pragma unroll
        for (int k = 0; k < kItems; ++k) {
            p[k] *= inv_a;
            q[k] *= inv_b;
            x[k] = log_ratio(x[k] - lse_a, y[k] - lse_b);  // x now holds d
            e[0] = fmaf(p[k], x[k], e[0]);
            e[1] = fmaf(q[k], x[k], e[1]);
            e[2] = fmaf(p[k] - q[k], x[k], e[2]);
        }
        group_sum<kGroup>(e, smem);
        if (lane == 0) row_loss[row] = e[2];
#pragma unroll
        for (int k = 0; k < kItems; ++k) {
            const int c = k * kGroup + lane;
            if (c < C) {
                ga[row * C + c] = from_float<T>(f * (p[k] * (x[k] - e[0]) + p[k] - q[k]));
                gb[row * C + c] = from_float<T>(f * (q[k] * (e[1] - x[k]) + q[k] - p[k]));
            }
        }
    }
}

// Online (max, sum-exp) for one side; the sum is rescaled whenever the max grows.
struct Online {
    float m = kNegInf, s = 0.f;
    __device__ __forceinline__ void add(float v) {
        if (v > m) {
            s *= __expf(m - v);  // 0 while m is still -inf
            m = v;
        }
        s += v == kNegInf ? 0.f : __expf(v - m);
    }
    // bring the partial sum to a shared max
    __device__ __forceinline__ void rebase(float m_all) { s *= m == kNegInf ? 0.f : __expf(m - m_all); }
};

// Rows longer than the on-chip paths: three passes over the row (the later ones mostly from L2). The first
// finds each side's log-sum-exp online; the second sums Ep, Eq and the loss from d = log p - log q formed per
// element, as the on-chip kernel does (Ep and Eq derived from sum p (a - b) and the log-sum-exps instead
// would subtract two numbers of the logits' scale to get a much smaller one, losing most digits when a and b
// differ by a per-row offset); the third writes the gradients.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    sym_kl_streaming_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ ga,
                            T* __restrict__ gb, float* __restrict__ row_loss, int64_t N, int C, float f) {
    __shared__ float smem[3 * 32];
    for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
        const T* ar = a + row * C;
        const T* br = b + row * C;
        Online oa, ob;
        for (int c = threadIdx.x; c < C; c += kBlockThreads) {
            oa.add(to_float(ar[c]));
            ob.add(to_float(br[c]));
        }
        float m[2] = {oa.m, ob.m};
        block_max(m, smem);
        oa.rebase(m[0]);
        ob.rebase(m[1]);
        float s[2] = {oa.s, ob.s};
        block_sum(s, smem);
        const float lse_a = m[0] + __logf(s[0]);
        const float lse_b = m[1] + __logf(s[1]);
        // e = (Ep, Eq, loss); the loss summed as (p - q) d so that a class that is -inf on one side only gives
        // +inf (as on the CPU) instead of 0 * -inf = NaN
        float e[3] = {0.f, 0.f, 0.f};
        for (int c = threadIdx.x; c < C; c += kBlockThreads) {
            const float lp = to_float(ar[c]) - lse_a;
            const float lq = to_float(br[c]) - lse_b;
            const float p = __expf(lp), q = __expf(lq);
            const float d = log_ratio(lp, lq);
            e[0] = fmaf(p, d, e[0]);
            e[1] = fmaf(q, d, e[1]);
            e[2] = fmaf(p - q, d, e[2]);
        }
        block_sum(e, smem);
        const float ep = e[0], eq = e[1];
        if (threadIdx.x == 0) row_loss[row] = e[2];
        for (int c = threadIdx.x; c < C; c += kBlockThreads) {
            const float lp = to_float(ar[c]) - lse_a;
            const float lq = to_float(br[c]) - lse_b;
            const float p = __expf(lp), q = __expf(lq);
            const float d = log_ratio(lp, lq);
            ga[row * C + c] = from_float<T>(f * (p * (d - ep) + p - q));
            gb[row * C + c] = from_float<T>(f * (q * (eq - d) + q - p));
        }
    }
}

// Sums the per-row losses in a fixed order (double accumulation) and applies the reduction.
__global__ void __launch_bounds__(1024) sym_kl_reduce_kernel(const float* __restrict__ row_loss, int64_t N,
                                                             double divisor, float* __restrict__ loss) {
    __shared__ double smem[32];
    double v[1] = {0.0};
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) v[0] += row_loss[i];
    block_sum(v, smem);
    if (threadIdx.x == 0) *loss = static_cast<float>(v[0] / divisor);
}

unsigned grid_for(int64_t blocks) {
    return static_cast<unsigned>(blocks < (int64_t(1) << 30) ? blocks : (int64_t(1) << 30));
}

template <typename T>
cudaError_t launch(const T* a, const T* b, T* ga, T* gb, float* row_loss, float* loss, int64_t N, int64_t C,
                   int32_t reduction, cudaStream_t stream) {
    const double divisor = reduction == 0 ? double(N) : double(N) * double(C);
    const float f = static_cast<float>(1.0 / divisor);
    const int c = static_cast<int>(C);
    if (C <= 32 * kWarpItems) {
        const int64_t blocks = (N + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock;
        sym_kl_on_chip_kernel<T, 32, kWarpItems>
            <<<grid_for(blocks), 32 * kWarpRowsPerBlock, 0, stream>>>(a, b, ga, gb, row_loss, N, c, f);
    } else if (C <= kBlockThreads * kBlockItems) {
        sym_kl_on_chip_kernel<T, kBlockThreads, kBlockItems>
            <<<grid_for(N), kBlockThreads, 0, stream>>>(a, b, ga, gb, row_loss, N, c, f);
    } else {
        sym_kl_streaming_kernel<T><<<grid_for(N), kBlockThreads, 0, stream>>>(a, b, ga, gb, row_loss, N, c, f);
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    sym_kl_reduce_kernel<<<1, 1024, 0, stream>>>(row_loss, N, divisor, loss);
    return cudaGetLastError();
}

}  // namespace

cudaError_t launch_sym_kl_fwd(const void* a, const void* b, void* grad_a, void* grad_b, float* row_loss,
                              float* loss, DType dtype, int64_t N, int64_t C, int32_t reduction,
                              cudaStream_t stream) {
    if (N < 1 || C < 2 || C > (int64_t(1) << 30)) return cudaErrorInvalidValue;
    switch (dtype) {
        case DType::kFloat32:
            return launch(static_cast<const float*>(a), static_cast<const float*>(b), static_cast<float*>(grad_a),
                          static_cast<float*>(grad_b), row_loss, loss, N, C, reduction, stream);
        case DType::kFloat16:
            return launch(static_cast<const __half*>(a), static_cast<const __half*>(b), static_cast<__half*>(grad_a),
                          static_cast<__half*>(grad_b), row_loss, loss, N, C, reduction, stream);
        case DType::kBFloat16:
            return launch(static_cast<const __nv_bfloat16*>(a), static_cast<const __nv_bfloat16*>(b),
                          static_cast<__nv_bfloat16*>(grad_a), static_cast<__nv_bfloat16*>(grad_b), row_loss, loss,
                          N, C, reduction, stream);
        default:
            return cudaErrorInvalidValue;
    }
}

}  // namespace villa_fast
