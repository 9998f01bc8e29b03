// perturb_update: argument checks, the CPU kernel and the dispatch to the CUDA launcher.
//
// Per row r (dim 0) of each delta, in the accumulate type (double for float64, else float):
//   g = grad[r] / grad_scale; a row with any non-finite g (or a norm past the accumulator's range) is left
//   unchanged and counted;
//   delta[r] += lr * g / max(||g||, 1e-8)       (||.||: l2, or max |.| for linf);
//   then, if max_norm > 0: l2 rescales rows with ||delta[r]||_2 > max_norm onto the ball,
//   linf clamps delta[r] to [-max_norm, max_norm].
#include <algorithm>
#include <atomic>
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include "common.h"
#include "ops.h"

namespace villa_fast {
namespace {

enum NormType : int64_t { kL2 = 0, kLinf = 1 };

// How g = grad / scale is formed: the loss scales of GradScaler are powers of two, for which
// multiplying by the exact reciprocal gives the same bits as dividing and vectorises well.
enum class Unscale { kNone, kMul, kDiv };

template <Unscale kMode, typename D, typename G>
int64_t update_rows_cpu_impl(D* delta, const G* grad, int64_t rows, int64_t n, double lr, bool l2, double max_norm,
                             double scale_in) {
    using acc_t = acc_type_t<D>;
    const acc_t scale = static_cast<acc_t>(scale_in);
    const acc_t lr_a = static_cast<acc_t>(lr);
    const acc_t bound = static_cast<acc_t>(max_norm);
    const acc_t eps = static_cast<acc_t>(1e-8);
    const acc_t inv = acc_t(1) / scale;
    const auto unscale = [scale, inv](G v) {
        const acc_t x = static_cast<acc_t>(v);
        if constexpr (kMode == Unscale::kMul) {
            return x * inv;
        } else if constexpr (kMode == Unscale::kDiv) {
            return x / scale;
        } else {
            return x;
        }
    };
    std::atomic<int64_t> skipped{0};
    // about 64K elements per task: enough work to amortise the task, rows never split
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(n, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
        int64_t local_skipped = 0;
        for (int64_t r = begin; r < end; ++r) {
            D* d = delta + r * n;
            const G* g = grad + r * n;
            // x - x is 0 for finite x and NaN for inf/NaN: one vectorisable sum flags the row
            acc_t norm = 0, nonfinite = 0;
            if (l2) {
#pragma omp simd reduction(+ : norm, nonfinite)
                for (int64_t j = 0; j < n; ++j) {
                    const acc_t x = unscale(g[j]);
                    norm += x * x;
                    nonfinite += x - x;
                }
                norm = std::sqrt(norm);
            } else {
#pragma omp simd reduction(max : norm) reduction(+ : nonfinite)
                for (int64_t j = 0; j < n; ++j) {
                    const acc_t x = unscale(g[j]);
                    norm = std::max(norm, std::abs(x));
                    nonfinite += x - x;
                }
            }
            // a finite row whose l2 norm overflows counts as non-finite: its step would round to zero
            if (nonfinite != 0 || !std::isfinite(norm)) {
                ++local_skipped;
                continue;
            }
            const acc_t step = lr_a / std::max(norm, eps);
            if (max_norm > 0 && l2) {
                acc_t dd = 0;
#pragma omp simd reduction(+ : dd)
                for (int64_t j = 0; j < n; ++j) {
                    const acc_t gj = unscale(g[j]);
                    const D x = static_cast<D>(static_cast<acc_t>(d[j]) + step * gj);
                    d[j] = x;
                    dd += static_cast<acc_t>(x) * static_cast<acc_t>(x);
                }
                const acc_t nd = std::sqrt(dd);
                if (nd > bound) {
                    const acc_t f = bound / nd;
#pragma omp simd
                    for (int64_t j = 0; j < n; ++j) d[j] = static_cast<D>(static_cast<acc_t>(d[j]) * f);
                }
            } else if (max_norm > 0) {
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) {
                    const acc_t x = static_cast<acc_t>(d[j]) + step * unscale(g[j]);
                    d[j] = static_cast<D>(std::min(std::max(x, -bound), bound));
                }
            } else {
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) {
                    d[j] = static_cast<D>(static_cast<acc_t>(d[j]) + step * unscale(g[j]));
                }
            }
        }
        skipped.fetch_add(local_skipped, std::memory_order_relaxed);
    });
    return skipped.load();
}

template <typename D, typename G>
int64_t update_rows_cpu(D* delta, const G* grad, int64_t rows, int64_t n, double lr, bool l2, double max_norm,
                        double scale) {
    using acc_t = acc_type_t<D>;
    const acc_t s = static_cast<acc_t>(scale);
    int exp2 = 0;
    const bool pow2 = std::frexp(s, &exp2) == acc_t(0.5) && std::isnormal(acc_t(1) / s);
    if (s == acc_t(1)) return update_rows_cpu_impl<Unscale::kNone>(delta, grad, rows, n, lr, l2, max_norm, scale);
    if (pow2) return update_rows_cpu_impl<Unscale::kMul>(delta, grad, rows, n, lr, l2, max_norm, scale);
    return update_rows_cpu_impl<Unscale::kDiv>(delta, grad, rows, n, lr, l2, max_norm, scale);
}

template <typename D>
int64_t dispatch_grad(D* d, const at::Tensor& grad, int64_t rows, int64_t n, double lr, bool l2, double max_norm,
                      double scale) {
    switch (grad.scalar_type()) {
        case at::kHalf:
            return update_rows_cpu(d, grad.data_ptr<at::Half>(), rows, n, lr, l2, max_norm, scale);
        case at::kBFloat16:
            return update_rows_cpu(d, grad.data_ptr<at::BFloat16>(), rows, n, lr, l2, max_norm, scale);
        case at::kDouble:  // float64 grads only reach here with a float64 delta (checked)
            return update_rows_cpu(d, grad.data_ptr<double>(), rows, n, lr, l2, max_norm, scale);
        default:
            return update_rows_cpu(d, grad.data_ptr<float>(), rows, n, lr, l2, max_norm, scale);
    }
}

// The one place that maps (delta dtype, grad dtype) to a CPU kernel instance.
int64_t dispatch_cpu(const at::Tensor& delta, const at::Tensor& grad, int64_t rows, int64_t n, double lr, bool l2,
                     double max_norm, double scale) {
    if (delta.scalar_type() == at::kDouble) {
        return dispatch_grad(delta.data_ptr<double>(), grad, rows, n, lr, l2, max_norm, scale);
    }
    return dispatch_grad(delta.data_ptr<float>(), grad, rows, n, lr, l2, max_norm, scale);
}

int64_t rows_of(const at::Tensor& t) { return t.size(0); }
int64_t row_len_of(const at::Tensor& t) { return t.size(0) > 0 ? t.numel() / t.size(0) : 0; }

#ifdef WITH_CUDA
void launch_cuda(const std::vector<at::Tensor>& deltas, const std::vector<at::Tensor>& grads,
                 const std::vector<double>& lrs, int64_t norm_type, double max_norm,
                 const c10::optional<at::Tensor>& grad_scale, at::Tensor& skipped) {
    const c10::cuda::CUDAGuard guard(deltas[0].device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(deltas[0].get_device()).stream();
    const int64_t count = static_cast<int64_t>(deltas.size());
    // one launch per kMaxPerturbSegments tensors (text and image deltas share one)
    for (int64_t first = 0; first < count; first += kMaxPerturbSegments) {
        PerturbUpdateParams p{};
        p.num_segments = static_cast<int32_t>(std::min<int64_t>(kMaxPerturbSegments, count - first));
        p.norm_type = static_cast<int32_t>(norm_type);
        p.max_norm = static_cast<float>(max_norm);
        p.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr() : nullptr;
        p.scale_dtype = grad_scale.has_value() ? launcher_dtype(grad_scale->scalar_type()) : DType::kFloat32;
        p.skipped = skipped.data_ptr<int64_t>() + first;
        int64_t row = 0;
        for (int32_t s = 0; s < p.num_segments; ++s) {
            const at::Tensor& d = deltas[first + s];
            const at::Tensor& g = grads[first + s];
            PerturbSegment& seg = p.seg[s];
            seg.delta = d.data_ptr<float>();
            seg.grad = g.data_ptr();
            seg.grad_dtype = launcher_dtype(g.scalar_type());
            seg.row_begin = row;
            seg.rows = rows_of(d);
            seg.row_len = row_len_of(d);
            seg.lr = static_cast<float>(lrs[first + s]);
            row += seg.rows;
        }
        p.total_rows = row;
        check_launch(launch_perturb_update(p, stream), "perturb_update_");
    }
}
#endif

}  // namespace

at::Tensor perturb_update_(std::vector<at::Tensor> deltas, std::vector<at::Tensor> grads, std::vector<double> lrs,
                           int64_t norm_type, double max_norm, c10::optional<at::Tensor> grad_scale) {
    TORCH_CHECK(!deltas.empty(), "perturb_update_: deltas must hold at least one tensor");
    TORCH_CHECK(grads.size() == deltas.size(), "perturb_update_: grads has ", grads.size(),
                " tensors but deltas has ", deltas.size());
    TORCH_CHECK(lrs.size() == deltas.size(), "perturb_update_: lrs has ", lrs.size(), " values but deltas has ",
                deltas.size());
    TORCH_CHECK(norm_type == kL2 || norm_type == kLinf, "perturb_update_: norm_type must be 0 (l2) or 1 (linf), got ",
                norm_type);
    TORCH_CHECK(max_norm >= 0 && !std::isnan(max_norm), "perturb_update_: max_norm must be >= 0, got ", max_norm);
    TORCH_CHECK(deltas[0].defined(), "perturb_update_: deltas[0] is undefined");
    const at::Device device = deltas[0].device();
    check_device_supported(deltas[0], "perturb_update_: deltas[0]");
    for (size_t i = 0; i < deltas.size(); ++i) {
        const at::Tensor& d = deltas[i];
        const at::Tensor& g = grads[i];
        TORCH_CHECK(d.defined(), "perturb_update_: deltas[", i, "] is undefined");
        TORCH_CHECK(g.defined(), "perturb_update_: grads[", i, "] is undefined");
        TORCH_CHECK(d.device() == device, "perturb_update_: deltas[", i, "] is on ", d.device(),
                    " but deltas[0] is on ", device);
        TORCH_CHECK(g.device() == device, "perturb_update_: grads[", i, "] is on ", g.device(),
                    " but deltas[0] is on ", device);
        TORCH_CHECK(d.dim() >= 1, "perturb_update_: deltas[", i,
                    "] must have shape [B, ...] (>= 1 dim), got a 0-dim tensor");
        TORCH_CHECK(g.sizes() == d.sizes(), "perturb_update_: grads[", i, "] has shape ", g.sizes(),
                    " but deltas[", i, "] has shape ", d.sizes());
        TORCH_CHECK(d.is_contiguous(), "perturb_update_: deltas[", i, "] must be contiguous");
        TORCH_CHECK(g.is_contiguous(), "perturb_update_: grads[", i, "] must be contiguous");
        const bool d_double = d.scalar_type() == at::kDouble;
        TORCH_CHECK(d.scalar_type() == at::kFloat || (d_double && d.is_cpu()), "perturb_update_: deltas[", i,
                    "] must be float32", device.is_cpu() ? " or float64" : " on CUDA (float64 on the CPU only)",
                    ", got ", d.scalar_type());
        const at::ScalarType gt = g.scalar_type();
        if (d_double) {
            TORCH_CHECK(gt == at::kDouble || gt == at::kFloat || gt == at::kHalf || gt == at::kBFloat16,
                        "perturb_update_: grads[", i, "] must be float64/float32/float16/bfloat16, got ", gt);
        } else {
            TORCH_CHECK(gt == at::kFloat || gt == at::kHalf || gt == at::kBFloat16, "perturb_update_: grads[", i,
                        "] must be float32/float16/bfloat16 for a float32 delta, got ", gt);
        }
        TORCH_CHECK(lrs[i] >= 0 && std::isfinite(lrs[i]), "perturb_update_: lrs[", i, "] must be finite and >= 0, got ",
                    lrs[i]);
    }
    if (grad_scale.has_value()) {
        const at::Tensor& s = *grad_scale;
        TORCH_CHECK(s.defined(), "perturb_update_: grad_scale is undefined (pass None for no scale)");
        TORCH_CHECK(s.numel() == 1, "perturb_update_: grad_scale must have exactly 1 element, got ", s.numel());
        TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
                    "perturb_update_: grad_scale must be float32 or float64, got ", s.scalar_type());
        TORCH_CHECK(s.device() == device, "perturb_update_: grad_scale is on ", s.device(), " but deltas are on ",
                    device);
    }

    const int64_t count = static_cast<int64_t>(deltas.size());
    at::Tensor skipped = at::zeros({count}, at::TensorOptions().dtype(at::kLong).device(device));
#ifdef WITH_CUDA
    if (device.is_cuda()) {
        launch_cuda(deltas, grads, lrs, norm_type, max_norm, grad_scale, skipped);
        return skipped;
    }
#endif
    double scale = 1.0;
    if (grad_scale.has_value()) scale = grad_scale->item<double>();
    int64_t* out = skipped.data_ptr<int64_t>();
    for (int64_t i = 0; i < count; ++i) {
        const at::Tensor& d = deltas[i];
        const int64_t rows = rows_of(d);
        // judged in the precision the rows are computed in: a float64 scale beyond float's range is inf there
        const double s = d.scalar_type() == at::kDouble ? scale : static_cast<double>(static_cast<float>(scale));
        if (!(std::isfinite(s) && s != 0)) {
            out[i] = rows;  // g = grad / scale is not finite (or not meaningful) anywhere
            continue;
        }
        out[i] = dispatch_cpu(d, grads[i], rows, row_len_of(d), lrs[i], norm_type == kL2, max_norm, scale);
    }
    return skipped;
}

}  // namespace villa_fast
