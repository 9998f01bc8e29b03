// add_if_: argument checks, the CPU kernel and the dispatch to the CUDA launcher.
//
// accs[i] += vals[i] for every pair when the one-element bool flag ok is true; otherwise nothing
// is read or written (a non-finite val never reaches acc). The adversarial step adds each step's
// checked parameter gradients this way: one multi-tensor launch instead of a masked fill and an
// add per parameter.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common.h"
#include "ops.h"

namespace villa_fast {
namespace {

template <typename T>
void add_cpu(T* acc, const T* val, int64_t n) {
    using acc_t = acc_type_t<T>;
    at::parallel_for(0, n, int64_t(1) << 15, [&](int64_t begin, int64_t end) {
#pragma omp simd
        for (int64_t i = begin; i < end; ++i) {
            acc[i] = static_cast<T>(static_cast<acc_t>(acc[i]) + static_cast<acc_t>(val[i]));
        }
    });
}

}  // namespace

void add_if_(std::vector<at::Tensor> accs, std::vector<at::Tensor> vals, const at::Tensor& ok) {
    TORCH_CHECK(accs.size() == vals.size(), "add_if_: accs has ", accs.size(), " tensors but vals has ",
                vals.size());
    TORCH_CHECK(ok.defined() && ok.numel() == 1 && ok.scalar_type() == at::kBool,
                "add_if_: ok must be a one-element bool tensor");
    check_device_supported(ok, "add_if_: ok");
    for (size_t i = 0; i < accs.size(); ++i) {
        const at::Tensor& a = accs[i];
        const at::Tensor& v = vals[i];
        TORCH_CHECK(a.defined() && v.defined(), "add_if_: accs[", i, "] and vals[", i, "] must be defined");
        TORCH_CHECK(a.device() == ok.device() && v.device() == ok.device(), "add_if_: accs[", i, "] (", a.device(),
                    ") and vals[", i, "] (", v.device(), ") must be on the device of ok (", ok.device(), ")");
        TORCH_CHECK(a.sizes() == v.sizes(), "add_if_: vals[", i, "] has shape ", v.sizes(), " but accs[", i,
                    "] has ", a.sizes());
        TORCH_CHECK(a.scalar_type() == v.scalar_type(), "add_if_: vals[", i, "] is ", v.scalar_type(),
                    " but accs[", i, "] is ", a.scalar_type());
        const at::ScalarType t = a.scalar_type();
        TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || (t == at::kDouble && a.is_cpu()),
                    "add_if_: accs[", i, "] must be float32, float16 or bfloat16", a.is_cpu() ? " or float64" : "",
                    " on ", a.device(), ", got ", t);
        TORCH_CHECK(a.is_contiguous() && v.is_contiguous(), "add_if_: accs[", i, "] and vals[", i,
                    "] must be contiguous");
    }
    if (accs.empty()) return;
    {
        // one element updated from two pairs would be a race between blocks: every acc once
        std::vector<const void*> ptrs;
        for (const at::Tensor& a : accs) {
            if (a.numel() > 0) ptrs.push_back(a.data_ptr());
        }
        std::sort(ptrs.begin(), ptrs.end());
        TORCH_CHECK(std::adjacent_find(ptrs.begin(), ptrs.end()) == ptrs.end(),
                    "add_if_: the same tensor appears twice in accs");
    }
#ifdef WITH_CUDA
    if (ok.is_cuda()) {
        const c10::cuda::CUDAGuard guard(ok.device());
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(ok.get_device()).stream();
        int sms = 0;
        check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, ok.get_device()), "add_if_");
        // one launch per dtype and per kMaxAddIfTensors tensors
        for (const at::ScalarType t : {at::kFloat, at::kHalf, at::kBFloat16}) {
            AddIfParams p{};
            p.ok = ok.data_ptr<bool>();
            p.dtype = launcher_dtype(t);
            const int64_t tile = add_if_tile_elems(p.dtype);
            auto flush = [&]() {
                if (p.num_tensors == 0) return;
                const int64_t tiles = p.tile_begin[p.num_tensors];
                const int blocks = static_cast<int>(std::min<int64_t>(tiles, int64_t(sms) * 8));
                check_launch(launch_add_if(p, blocks, stream), "add_if_");
                p.num_tensors = 0;
            };
            for (size_t i = 0; i < accs.size(); ++i) {
                if (accs[i].scalar_type() != t || accs[i].numel() == 0) continue;
                const int k = p.num_tensors;
                p.acc[k] = accs[i].data_ptr();
                p.val[k] = vals[i].data_ptr();
                p.numel[k] = accs[i].numel();
                p.tile_begin[k + 1] = p.tile_begin[k] + (p.numel[k] + tile - 1) / tile;
                if (++p.num_tensors == kMaxAddIfTensors) flush();
            }
            flush();
        }
        return;
    }
#endif
    if (!ok.item<bool>()) return;
    for (size_t i = 0; i < accs.size(); ++i) {
        at::Tensor& a = accs[i];
        const at::Tensor& v = vals[i];
        switch (a.scalar_type()) {
            case at::kDouble:
                add_cpu(a.data_ptr<double>(), v.data_ptr<double>(), a.numel());
                break;
            case at::kFloat:
                add_cpu(a.data_ptr<float>(), v.data_ptr<float>(), a.numel());
                break;
            case at::kHalf:
                add_cpu(a.data_ptr<at::Half>(), v.data_ptr<at::Half>(), a.numel());
                break;
            default:
                add_cpu(a.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), a.numel());
                break;
        }
    }
}

}  // namespace villa_fast
