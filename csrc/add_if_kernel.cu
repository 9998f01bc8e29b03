// CUDA kernel of add_if_: acc[i] += val[i] over many tensors in one launch, when a device flag
// says so (the adversarial step's finiteness check), with no host sync.
//
// The tensors of a launch are cut into tiles of kThreads * kVec * kUnroll elements; block b walks
// tiles b, b + gridDim.x, ... and finds each tile's tensor by a binary search over the prefix
// sums of tiles per tensor. Full tiles of 16-byte aligned tensors move 16 bytes per load with
// kUnroll loads in flight per thread; the last tile of a tensor, and unaligned tensors, go element
// by element. When the flag is false every block returns at once: nothing is read or written, so
// a non-finite val never reaches acc. Sums are computed in float and rounded to the tensor type,
// as torch's add_ does for half and bfloat16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace villa_fast {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <typename T>
__host__ __device__ constexpr int64_t tile_elems() {
    return int64_t(kThreads) * Pack16<T>::kSize * kUnroll;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) add_if_kernel(const AddIfParams p) {
    if (!*p.ok) return;
    using V = Pack16<T>;
    constexpr int kN = V::kSize;
    constexpr int64_t kTile = tile_elems<T>();
    const int64_t total = p.tile_begin[p.num_tensors];
    for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
        const int t = tile_owner(p.tile_begin, p.num_tensors, tile);
        T* __restrict__ acc = static_cast<T*>(p.acc[t]);
        const T* __restrict__ val = static_cast<const T*>(p.val[t]);
        const int64_t n = p.numel[t];
        const int64_t start = (tile - p.tile_begin[t]) * kTile;
        const bool aligned = ((reinterpret_cast<uintptr_t>(acc) | reinterpret_cast<uintptr_t>(val)) & 15) == 0;
        if (aligned && start + kTile <= n) {
            V a[kUnroll], v[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                const int64_t i = start + (int64_t(u) * kThreads + threadIdx.x) * kN;
                a[u] = *reinterpret_cast<const V*>(acc + i);
                v[u] = *reinterpret_cast<const V*>(val + i);
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
                for (int k = 0; k < kN; ++k) a[u].v[k] = from_float<T>(to_float(a[u].v[k]) + to_float(v[u].v[k]));
                const int64_t i = start + (int64_t(u) * kThreads + threadIdx.x) * kN;
                *reinterpret_cast<V*>(acc + i) = a[u];
            }
        } else {
            const int64_t end = start + kTile < n ? start + kTile : n;
            for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
                acc[i] = from_float<T>(to_float(acc[i]) + to_float(val[i]));
            }
        }
    }
}

}  // namespace

int64_t add_if_tile_elems(DType dtype) {
    switch (dtype) {
        case DType::kFloat16:
            return tile_elems<__half>();
        case DType::kBFloat16:
            return tile_elems<__nv_bfloat16>();
        default:
            return tile_elems<float>();
    }
}

cudaError_t launch_add_if(const AddIfParams& params, int blocks, cudaStream_t stream) {
    if (params.num_tensors <= 0 || params.tile_begin[params.num_tensors] == 0) return cudaSuccess;
    if (blocks < 1) blocks = 1;
    return with_float_type(params.dtype, [&](auto tag) {
        add_if_kernel<decltype(tag)><<<blocks, kThreads, 0, stream>>>(params);
    });
}

}  // namespace villa_fast
