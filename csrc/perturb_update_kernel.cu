// CUDA kernel of perturb_update: the normalised ascent step on the perturbations, with
// projection, for every (delta, grad) pair of a call in a single launch.
//
// One block per row (grid-stride over all rows of all segments). A row is read with 16-byte
// loads when its pointers and length allow it. Rows of up to kOnChip elements are held in
// registers: grad and delta are read once and delta written once. Longer rows stream: pass 1
// reads grad (and delta when the l2 projection needs it) for the norms, pass 2 re-reads them,
// mostly from L2, and writes delta.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace villa_fast {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 512;
constexpr int kItems = 16;  // elements per thread in the on-chip path (2 x 16 registers)
constexpr int64_t kOnChip = int64_t(kThreads) * kItems;

template <int VEC>
__device__ __forceinline__ void load_delta(const float* p, float (&o)[VEC]) {
    if constexpr (VEC == 1) {
        o[0] = *p;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; i += 4) {
            const float4 t = *reinterpret_cast<const float4*>(p + i);
            o[i] = t.x, o[i + 1] = t.y, o[i + 2] = t.z, o[i + 3] = t.w;
        }
    }
}

template <int VEC>
__device__ __forceinline__ void store_delta(float* p, const float (&o)[VEC]) {
    if constexpr (VEC == 1) {
        *p = o[0];
    } else {
#pragma unroll
        for (int i = 0; i < VEC; i += 4) {
            *reinterpret_cast<float4*>(p + i) = make_float4(o[i], o[i + 1], o[i + 2], o[i + 3]);
        }
    }
}

// g = grad / scale, bit-identical to IEEE division (as on the CPU, never the --use_fast_math
// approximation). Loss scales are powers of two, where multiplying by the exact reciprocal
// (inv != 0) gives the same bits for a fraction of the instructions.
struct Scale {
    float scale, inv;
};

__device__ __forceinline__ float unscale(float x, Scale s) { return s.inv != 0.f ? x * s.inv : __fdiv_rn(x, s.scale); }

__device__ __forceinline__ Scale make_scale(float scale) {
    const unsigned bits = __float_as_uint(scale);
    const unsigned expo = (bits >> 23) & 0xffu;
    // a normal power of two whose reciprocal is normal too
    const bool pow2 = (bits & 0x7fffffu) == 0 && expo > 1 && expo < 253;
    return {scale, pow2 ? __fdiv_rn(1.f, scale) : 0.f};
}

// Loads VEC grad elements as g = grad / scale.
template <typename G, int VEC>
__device__ __forceinline__ void load_grad(const G* p, Scale scale, float (&o)[VEC]) {
    if constexpr (VEC == 1) {
        o[0] = unscale(to_float(*p), scale);
    } else {
        static_assert(VEC * sizeof(G) == 16, "one 16-byte load per pack");
        const uint4 raw = *reinterpret_cast<const uint4*>(p);
        const G* e = reinterpret_cast<const G*>(&raw);
#pragma unroll
        for (int i = 0; i < VEC; ++i) o[i] = unscale(to_float(e[i]), scale);
    }
}

struct RowArgs {
    float* d;
    const void* g;
    int64_t n;
    float lr;
    Scale scale;
    bool l2;
    float max_norm;
};

// Step size and, for l2, the factor that projects the updated row back onto the ball.
// Returns false when the row has a non-finite gradient and must be left alone.
__device__ __forceinline__ bool finish_stats(const RowArgs& a, float gnorm_part, float bad, float& step) {
    if (bad != 0.f) return false;
    const float gn = a.l2 ? sqrtf(gnorm_part) : gnorm_part;
    if (!isfinite(gn)) return false;  // a finite row whose l2 norm overflows: its step would round to zero
    step = a.lr / fmaxf(gn, 1e-8f);
    return true;
}

__device__ __forceinline__ float clamp_linf(float x, float m) { return fminf(fmaxf(x, -m), m); }

// Row held in registers: thread t owns packs t, t + kThreads, ... of VEC elements each.
template <typename G, int VEC>
__device__ bool update_row_on_chip(const RowArgs& a, float* smem) {
    constexpr int kPacks = kItems / VEC;
    const G* g = static_cast<const G*>(a.g);
    float gr[kItems], dr[kItems];
    float norm_part = 0.f, bad = 0.f;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
        const int64_t off = (int64_t(k) * kThreads + threadIdx.x) * VEC;
        float gv[VEC], dv[VEC];
        if (off < a.n) {
            load_grad<G, VEC>(g + off, a.scale, gv);
            load_delta<VEC>(a.d + off, dv);
        } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) gv[i] = 0.f, dv[i] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            gr[k * VEC + i] = gv[i];
            dr[k * VEC + i] = dv[i];
            if (!isfinite(gv[i])) bad = 1.f;
            norm_part = a.l2 ? fmaf(gv[i], gv[i], norm_part) : fmaxf(norm_part, fabsf(gv[i]));
        }
    }
    float step;
    if (a.l2) {
        float v[2] = {norm_part, bad};
        block_sum(v, smem);
        if (!finish_stats(a, v[0], v[1], step)) return false;
    } else {
        // a non-finite element makes the max infinite, which no finite row reaches
        float v[1] = {bad != 0.f ? __int_as_float(0x7f800000) : norm_part};
        block_max(v, smem);
        if (!finish_stats(a, v[0], isinf(v[0]) ? 1.f : 0.f, step)) return false;
    }
    float dd = 0.f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
        dr[i] = fmaf(step, gr[i], dr[i]);
        dd = fmaf(dr[i], dr[i], dd);
    }
    float factor = 1.f;
    if (a.max_norm > 0.f && a.l2) {
        // exact norm of the updated row: it is already in registers
        float v[1] = {dd};
        block_sum(v, smem);
        const float nd = sqrtf(v[0]);
        if (nd > a.max_norm) factor = a.max_norm / nd;
    }
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
        const int64_t off = (int64_t(k) * kThreads + threadIdx.x) * VEC;
        if (off < a.n) {
            float out[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float x = dr[k * VEC + i];
                out[i] = a.max_norm > 0.f ? (a.l2 ? x * factor : clamp_linf(x, a.max_norm)) : x;
            }
            store_delta<VEC>(a.d + off, out);
        }
    }
    return true;
}

// Row streamed: one pass for the gradient's norm, one for the update; with the l2 projection, the updated row's
// norm is summed as it is written and a third pass rescales a row that left the ball (the norm of d + s g from
// partial sums of d and g would cancel when the step nearly undoes d).
template <typename G, int VEC>
__device__ bool update_row_streaming(const RowArgs& a, float* smem) {
    const G* g = static_cast<const G*>(a.g);
    const int64_t npacks = a.n / VEC;
    const bool project_l2 = a.l2 && a.max_norm > 0.f;
    float norm_part = 0.f, bad = 0.f;
    // Unrolled so that each thread has several independent 16-byte loads in flight: a long row gets one
    // block, often alone on its SM, and one load per thread (8 KB per SM) is far from hiding DRAM latency.
    // The sums keep their sequential order.
#pragma unroll 4
    for (int64_t pk = threadIdx.x; pk < npacks; pk += kThreads) {
        float gv[VEC];
        load_grad<G, VEC>(g + pk * VEC, a.scale, gv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            if (!isfinite(gv[i])) bad = 1.f;
            norm_part = a.l2 ? fmaf(gv[i], gv[i], norm_part) : fmaxf(norm_part, fabsf(gv[i]));
        }
    }
    float step;
    if (a.l2) {
        float v[2] = {norm_part, bad};
        block_sum(v, smem);
        if (!finish_stats(a, v[0], v[1], step)) return false;
    } else {
        float v[1] = {bad != 0.f ? __int_as_float(0x7f800000) : norm_part};
        block_max(v, smem);
        if (!finish_stats(a, v[0], isinf(v[0]) ? 1.f : 0.f, step)) return false;
    }
    float dd = 0.f;
#pragma unroll 4
    for (int64_t pk = threadIdx.x; pk < npacks; pk += kThreads) {
        float gv[VEC], dv[VEC];
        load_grad<G, VEC>(g + pk * VEC, a.scale, gv);
        load_delta<VEC>(a.d + pk * VEC, dv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const float x = fmaf(step, gv[i], dv[i]);
            dd = fmaf(x, x, dd);
            dv[i] = (a.max_norm > 0.f && !a.l2) ? clamp_linf(x, a.max_norm) : x;
        }
        store_delta<VEC>(a.d + pk * VEC, dv);
    }
    if (project_l2) {
        float v[1] = {dd};
        block_sum(v, smem);
        const float nd = sqrtf(v[0]);
        if (nd > a.max_norm) {
            const float factor = a.max_norm / nd;
            // each thread rescales the packs it wrote: no other thread's writes are read
#pragma unroll 4
            for (int64_t pk = threadIdx.x; pk < npacks; pk += kThreads) {
                float dv[VEC];
                load_delta<VEC>(a.d + pk * VEC, dv);
#pragma unroll
                for (int i = 0; i < VEC; ++i) dv[i] *= factor;
                store_delta<VEC>(a.d + pk * VEC, dv);
            }
        }
    }
    return true;
}

template <typename G>
__device__ bool update_row(const RowArgs& a, float* smem) {
    constexpr int kVec = 16 / sizeof(G);
    const bool aligned = a.n % kVec == 0 && reinterpret_cast<uintptr_t>(a.d) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(a.g) % 16 == 0;
    if (a.n <= kOnChip) {
        return aligned ? update_row_on_chip<G, kVec>(a, smem) : update_row_on_chip<G, 1>(a, smem);
    }
    return aligned ? update_row_streaming<G, kVec>(a, smem) : update_row_streaming<G, 1>(a, smem);
}

__global__ void __launch_bounds__(kThreads) perturb_update_kernel(const PerturbUpdateParams p) {
    __shared__ float smem[4 * 32];
    float scale = 1.f;
    if (p.grad_scale != nullptr) {
        // read on the device so that a loss scaler never forces a host sync
        scale = p.scale_dtype == DType::kFloat64 ? float(*static_cast<const double*>(p.grad_scale))
                                                 : *static_cast<const float*>(p.grad_scale);
    }
    const bool scale_ok = isfinite(scale) && scale != 0.f;
    for (int64_t row = blockIdx.x; row < p.total_rows; row += gridDim.x) {
        // constant indices only: a runtime index into the parameter struct would copy it to local memory
        int s = 0;
        PerturbSegment seg = p.seg[0];
#pragma unroll
        for (int i = 1; i < kMaxPerturbSegments; ++i) {
            if (i < p.num_segments && row >= p.seg[i].row_begin) {
                s = i;
                seg = p.seg[i];
            }
        }
        const int64_t r = row - seg.row_begin;
        bool done = false;
        if (scale_ok) {
            RowArgs a;
            a.d = seg.delta + r * seg.row_len;
            a.n = seg.row_len;
            a.lr = seg.lr;
            a.scale = make_scale(scale);
            a.l2 = p.norm_type == 0;
            a.max_norm = p.max_norm;
            switch (seg.grad_dtype) {
                case DType::kFloat16:
                    a.g = static_cast<const __half*>(seg.grad) + r * seg.row_len;
                    done = update_row<__half>(a, smem);
                    break;
                case DType::kBFloat16:
                    a.g = static_cast<const __nv_bfloat16*>(seg.grad) + r * seg.row_len;
                    done = update_row<__nv_bfloat16>(a, smem);
                    break;
                default:
                    a.g = static_cast<const float*>(seg.grad) + r * seg.row_len;
                    done = update_row<float>(a, smem);
                    break;
            }
        }
        if (!done && threadIdx.x == 0) {
            // integer atomics: the count is exact and order-independent
            atomicAdd(reinterpret_cast<unsigned long long*>(p.skipped + s), 1ull);
        }
    }
}

}  // namespace

cudaError_t launch_perturb_update(const PerturbUpdateParams& params, cudaStream_t stream) {
    if (params.num_segments < 1 || params.num_segments > kMaxPerturbSegments) return cudaErrorInvalidValue;
    if (params.total_rows == 0) return cudaSuccess;
    const int64_t blocks = params.total_rows < (int64_t(1) << 30) ? params.total_rows : (int64_t(1) << 30);
    perturb_update_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(params);
    return cudaGetLastError();
}

}  // namespace villa_fast
