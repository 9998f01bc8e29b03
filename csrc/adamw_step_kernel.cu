// CUDA kernels of adamw_step_: the authors' AdamW rule over many float32 parameters in one launch,
// reading each of p, g, m, v once and writing p, m, v once (28 bytes per element with fp32 gradients).
//
// Two launches per call of launch_adamw_step, on one stream: a one-block kernel advances every step
// count by one, then the update kernel reads the advanced counts. (One kernel cannot do both: a block
// that reads a count after another block advanced it would see the wrong step.) With a found_inf flag
// that is non-zero on the device, both return at once and nothing is read or written, NaN/inf gradients
// included. lr, the gradient scale and the flag are read on the device: no host sync, capture-safe.
//
// The update walks tiles as add_if does: block b takes tiles b, b + gridDim.x, ... and finds each tile's
// tensor by a binary search over the prefix sums of tiles. Full tiles whose p, m, v are 16-byte aligned
// and whose gradient is aligned to its 4-element vector move 4 elements per access with kUnroll accesses
// in flight per thread; the last tile of a tensor, and unaligned tensors, go element by element.
//
// Per tile, the step size lr * sqrt(1 - b2^t) / (1 - b1^t) is computed as -expm1(t log b) in float:
// accurate to a few ulp (1 - b^t from a float b would lose up to 1e-5 of it for b = 0.999).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace villa_fast {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int kUnroll = 2;
constexpr int64_t kTile = int64_t(kThreads) * kVec * kUnroll;

static_assert(sizeof(AdamWStepParams) <= 4096, "AdamWStepParams must fit the 4 KB kernel parameter space");

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
    T v[kVec];
};

__device__ __forceinline__ bool is_nonzero(const void* x, DType dtype) {
    return dtype == DType::kFloat64 ? *static_cast<const double*>(x) != 0.0 : *static_cast<const float*>(x) != 0.0f;
}

__device__ __forceinline__ float load_float(const void* x, DType dtype) {
    return dtype == DType::kFloat64 ? float(*static_cast<const double*>(x)) : *static_cast<const float*>(x);
}

__device__ __forceinline__ bool skipped(const AdamWStepParams& p) {
    return p.found_inf != nullptr && is_nonzero(p.found_inf, p.found_inf_dtype);
}

struct Scalars {
    float size;   // lr, times the bias corrections
    float decay;  // 1 - lr * weight_decay
    float scale;  // the gradient scale (1 when there is none)
};

// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; w -= size * m / (sqrt(v) + eps); w *= decay
__device__ __forceinline__ void update(const AdamWStepParams& p, const Scalars& s, bool scaled, float& w, float& m,
                                       float& v, float g) {
    if (scaled) g = g / s.scale;
    m = p.beta1 * m + p.one_minus_beta1 * g;
    v = p.beta2 * v + p.one_minus_beta2 * (g * g);
    const float denom = sqrtf(v) + p.eps;
    w = w - s.size * (m / denom);
    if (p.use_decay) w = w * s.decay;
}

__global__ void adamw_step_count_kernel(const AdamWStepParams p) {
    if (skipped(p)) return;
    for (int i = threadIdx.x; i < p.num_tensors; i += blockDim.x) *p.step[i] += 1.0f;
}

template <typename G>
__global__ void __launch_bounds__(kThreads) adamw_step_kernel(const AdamWStepParams p) {
    if (skipped(p)) return;
    const float lr = p.lr_ptr != nullptr ? load_float(p.lr_ptr, p.lr_dtype) : p.lr;
    const bool scaled = p.grad_scale != nullptr;
    Scalars s;
    s.decay = p.lr_ptr != nullptr ? 1.0f - lr * p.weight_decay : p.decay;
    s.scale = scaled ? load_float(p.grad_scale, p.scale_dtype) : 1.0f;
    using VG = Vec<G>;
    using VF = Vec<float>;
    const int64_t total = p.tile_begin[p.num_tensors];
    for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
        const int t = tile_owner(p.tile_begin, p.num_tensors, tile);
        s.size = lr;
        if (p.correct_bias) {
            const float step = *p.step[t];
            const float bc1 = -expm1f(step * p.log_beta1);
            const float bc2 = -expm1f(step * p.log_beta2);
            s.size = lr * sqrtf(bc2) / bc1;
        }
        float* __restrict__ w = p.param[t];
        float* __restrict__ m = p.exp_avg[t];
        float* __restrict__ v = p.exp_avg_sq[t];
        const G* __restrict__ g = static_cast<const G*>(p.grad[t]);
        const int64_t n = p.numel[t];
        const int64_t start = (tile - p.tile_begin[t]) * kTile;
        const bool aligned = ((reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(m) |
                               reinterpret_cast<uintptr_t>(v)) &
                              15) == 0 &&
                             (reinterpret_cast<uintptr_t>(g) & (sizeof(VG) - 1)) == 0;
        if (aligned && start + kTile <= n) {
            VF wv[kUnroll], mv[kUnroll], vv[kUnroll];
            VG gv[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int64_t i = start + (int64_t(u) * kThreads + threadIdx.x) * kVec;
                wv[u] = *reinterpret_cast<const VF*>(w + i);
                mv[u] = *reinterpret_cast<const VF*>(m + i);
                vv[u] = *reinterpret_cast<const VF*>(v + i);
                gv[u] = *reinterpret_cast<const VG*>(g + i);
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
                for (int k = 0; k < kVec; ++k) {
                    update(p, s, scaled, wv[u].v[k], mv[u].v[k], vv[u].v[k], to_float(gv[u].v[k]));
                }
                const int64_t i = start + (int64_t(u) * kThreads + threadIdx.x) * kVec;
                *reinterpret_cast<VF*>(w + i) = wv[u];
                *reinterpret_cast<VF*>(m + i) = mv[u];
                *reinterpret_cast<VF*>(v + i) = vv[u];
            }
        } else {
            const int64_t end = start + kTile < n ? start + kTile : n;
            for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
                float wi = w[i], mi = m[i], vi = v[i];
                update(p, s, scaled, wi, mi, vi, to_float(g[i]));
                w[i] = wi;
                m[i] = mi;
                v[i] = vi;
            }
        }
    }
}

}  // namespace

int64_t adamw_step_tile_elems() { return kTile; }

cudaError_t launch_adamw_step(const AdamWStepParams& params, int blocks, cudaStream_t stream) {
    if (params.num_tensors <= 0) return cudaSuccess;
    if (params.num_tensors > kMaxAdamWTensors) return cudaErrorInvalidValue;
    adamw_step_count_kernel<<<1, kMaxAdamWTensors, 0, stream>>>(params);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || params.tile_begin[params.num_tensors] == 0) return err;
    if (blocks < 1) blocks = 1;
    return with_float_type(params.grad_dtype, [&](auto tag) {
        adamw_step_kernel<decltype(tag)><<<blocks, kThreads, 0, stream>>>(params);
    });
}

}  // namespace villa_fast
