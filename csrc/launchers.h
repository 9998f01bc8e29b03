// Host-side entry points of the CUDA kernels of villa_fast._C.
//
// Plain C++ only (raw pointers, sizes, a dtype code, the stream): the .cu files include
// this header and no torch header, so each compiles with `nvcc -c` in seconds, and the
// .cpp files convert tensors to these arguments after checking them.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace villa_fast {

// Element type of a buffer handed to a launcher.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// ---- perturb_update ----------------------------------------------------------------------
// One segment per (delta, grad) pair; all segments of a call are updated by one launch.
constexpr int kMaxPerturbSegments = 8;

struct PerturbSegment {
    float* delta;        // [rows, row_len] float32, contiguous
    const void* grad;    // [rows, row_len] of grad_dtype, contiguous
    int64_t row_begin;   // first global row of this segment (prefix sum of rows)
    int64_t rows;
    int64_t row_len;
    float lr;
    DType grad_dtype;
};

struct PerturbUpdateParams {
    PerturbSegment seg[kMaxPerturbSegments];
    int32_t num_segments;
    int64_t total_rows;
    int32_t norm_type;        // 0 = l2, 1 = linf
    float max_norm;           // 0 disables the projection
    const void* grad_scale;   // nullptr, or one element of scale_dtype on the device
    DType scale_dtype;
    int64_t* skipped;         // [num_segments] counters, zeroed by the caller
};

cudaError_t launch_perturb_update(const PerturbUpdateParams& params, cudaStream_t stream);

// ---- perturb_init ------------------------------------------------------------------------
// noise [B, P, D] (float32 or float64) scaled in place; mask [B, P] of the same dtype or nullptr.
cudaError_t launch_perturb_init(void* noise, const void* mask, DType dtype, int64_t B, int64_t P, int64_t D,
                                double init_mag, int32_t norm_type, cudaStream_t stream);

// ---- sym_kl ------------------------------------------------------------------------------
// a, b, grad_a, grad_b: [N, C] of dtype (float32, float16 or bfloat16); row_loss: [N] float
// scratch; loss: one float. reduction 0 = batchmean (divide by N), 1 = mean (by N * C).
cudaError_t launch_sym_kl_fwd(const void* a, const void* b, void* grad_a, void* grad_b, float* row_loss,
                              float* loss, DType dtype, int64_t N, int64_t C, int32_t reduction,
                              cudaStream_t stream);

// ---- add_if -------------------------------------------------------------------------------
// acc[i] += val[i] for up to kMaxAddIfTensors pairs of contiguous tensors of one dtype, when the
// device flag *ok is true; nothing is read or written otherwise. Each tensor is cut into tiles of
// add_if_tile_elems(dtype) elements; tile_begin holds their prefix sums (tile_begin[num_tensors] =
// all tiles), and the blocks walk the tiles of every tensor in one launch.
constexpr int kMaxAddIfTensors = 40;

struct AddIfParams {
    void* acc[kMaxAddIfTensors];
    const void* val[kMaxAddIfTensors];
    int64_t numel[kMaxAddIfTensors];
    int64_t tile_begin[kMaxAddIfTensors + 1];
    int32_t num_tensors;
    const bool* ok;
    DType dtype;  // float32, float16 or bfloat16
};

int64_t add_if_tile_elems(DType dtype);
cudaError_t launch_add_if(const AddIfParams& params, int blocks, cudaStream_t stream);

// ---- adamw_step -------------------------------------------------------------------------
// The authors' AdamW rule over up to kMaxAdamWTensors float32 parameters (contiguous, each with its
// gradient of grad_dtype, its two moments and its 0-dim float32 step count) in one kernel launch,
// after a one-block launch that advances the step counts. When found_inf is set and non-zero on the
// device, neither launch writes anything. Tiles and their prefix sums as for add_if
// (adamw_step_tile_elems() elements per tile). The struct is passed by value: under 4 KB.
constexpr int kMaxAdamWTensors = 64;

struct AdamWStepParams {
    float* param[kMaxAdamWTensors];
    const void* grad[kMaxAdamWTensors];
    float* exp_avg[kMaxAdamWTensors];
    float* exp_avg_sq[kMaxAdamWTensors];
    float* step[kMaxAdamWTensors];
    int64_t numel[kMaxAdamWTensors];
    int64_t tile_begin[kMaxAdamWTensors + 1];
    int32_t num_tensors;
    DType grad_dtype;        // float32, float16 or bfloat16
    float lr;                // used when lr_ptr is null
    const void* lr_ptr;      // nullptr, or one element of lr_dtype on the device
    DType lr_dtype;
    float beta1, beta2;      // rounded to float: the factors of the moments
    float one_minus_beta1;   // 1 - beta1 and 1 - beta2 computed in double, then rounded
    float one_minus_beta2;
    float log_beta1;         // log(beta1), log(beta2) in double, rounded: 1 - beta^t = -expm1(t log beta)
    float log_beta2;
    float eps;
    float weight_decay;
    float decay;             // 1 - lr * weight_decay in double, rounded (used when lr_ptr is null)
    int32_t correct_bias;
    int32_t use_decay;       // weight_decay > 0
    const void* grad_scale;  // nullptr, or one element of scale_dtype: the gradients are divided by it
    DType scale_dtype;
    const void* found_inf;   // nullptr, or one element of found_inf_dtype: non-zero = change nothing
    DType found_inf_dtype;
};

int64_t adamw_step_tile_elems();
cudaError_t launch_adamw_step(const AdamWStepParams& params, int blocks, cudaStream_t stream);

// ---- device helpers shared by the .cu files (not seen by the host compiler) -------------
#if defined(__CUDACC__)
namespace cuda_detail {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Reductions over a whole block. Every thread gets the result; the order of additions is
// fixed by the block shape, so results are bit-reproducible. smem needs N * 32 elements of T.
// Safe to call repeatedly with the same smem.
template <typename T, int N>
__device__ __forceinline__ void warp_sum(T (&v)[N]) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
    }
}

template <typename T, int N>
__device__ __forceinline__ void warp_max(T (&v)[N]) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
        for (int i = 0; i < N; ++i) v[i] = fmax(v[i], __shfl_xor_sync(0xffffffffu, v[i], off));
    }
}

template <typename T, int N, bool kMax>
__device__ __forceinline__ void block_reduce(T (&v)[N], T* smem) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    if constexpr (kMax) {
        warp_max(v);
    } else {
        warp_sum(v);
    }
    __syncthreads();  // the previous call's readers are done with smem
    if (lane == 0) {
#pragma unroll
        for (int i = 0; i < N; ++i) smem[i * 32 + warp] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) {
        T r = smem[i * 32];
        for (int w = 1; w < nwarps; ++w) r = kMax ? fmax(r, smem[i * 32 + w]) : r + smem[i * 32 + w];
        v[i] = r;
    }
}

// 16 bytes of T: one vectorised load or store of 16-byte aligned data.
template <typename T>
struct alignas(16) Pack16 {
    static constexpr int kSize = 16 / sizeof(T);
    T v[kSize];
};

// Multi-tensor launches cut each tensor into tiles; tile_begin[t] is the first tile of tensor t (prefix
// sums, tile_begin[num_tensors] = all tiles). The tensor that owns ``tile``: the last t with
// tile_begin[t] <= tile (a tensor without elements has no tile of its own).
__device__ __forceinline__ int tile_owner(const int64_t* tile_begin, int num_tensors, int64_t tile) {
    int lo = 0, hi = num_tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (tile_begin[mid] <= tile) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

// Calls f(T{}) with T the element type of dtype (float32, float16 or bfloat16); returns the launch's
// error, or cudaErrorInvalidValue for another dtype.
template <typename F>
cudaError_t with_float_type(DType dtype, F&& f) {
    switch (dtype) {
        case DType::kFloat32:
            f(float{});
            break;
        case DType::kFloat16:
            f(__half{});
            break;
        case DType::kBFloat16:
            f(__nv_bfloat16{});
            break;
        default:
            return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

template <typename T, int N>
__device__ __forceinline__ void block_sum(T (&v)[N], T* smem) { block_reduce<T, N, false>(v, smem); }
template <typename T, int N>
__device__ __forceinline__ void block_max(T (&v)[N], T* smem) { block_reduce<T, N, true>(v, smem); }

}  // namespace cuda_detail
#endif  // __CUDACC__

}  // namespace villa_fast
