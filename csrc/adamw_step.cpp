// adamw_step_: argument checks, the CPU kernel and the dispatch to the CUDA launcher.
//
// The authors' AdamW rule (villa_fast.train.optim.AdamW) over many parameters, in place, with the
// step count t of each parameter advanced first:
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
//   (size lr without correct_bias);  then p *= 1 - lr * weight_decay.
// g is the gradient divided by grad_scale when one is given; with a non-zero found_inf nothing changes.
// Math in float (double for double parameters on the CPU); the scalars of a tensor in double. The CPU
// kernel takes four floats at a time with SSE where the compiler targets x86-64.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common.h"
#include "ops.h"

namespace villa_fast {
namespace {

template <typename T>
struct CpuScalars {
    T beta1, one_minus_beta1, beta2, one_minus_beta2, eps, size, decay, scale;
    bool scaled, use_decay;
};

template <typename T, typename G>
void update_scalar(T* w, const G* g, T* m, T* v, int64_t begin, int64_t end, const CpuScalars<T>& s) {
    for (int64_t i = begin; i < end; ++i) {
        T gi = static_cast<T>(g[i]);
        if (s.scaled) gi = gi / s.scale;
        const T mi = s.beta1 * m[i] + s.one_minus_beta1 * gi;
        const T vi = s.beta2 * v[i] + s.one_minus_beta2 * (gi * gi);
        const T denom = std::sqrt(vi) + s.eps;
        T wi = w[i] - s.size * (mi / denom);
        if (s.use_decay) wi = wi * s.decay;
        w[i] = wi;
        m[i] = mi;
        v[i] = vi;
    }
}

#if defined(__SSE2__)
template <typename G>
inline __m128 load4(const G* g) {
    if constexpr (std::is_same_v<G, float>) {
        return _mm_loadu_ps(g);
    } else {
        alignas(16) float t[4];
        for (int k = 0; k < 4; ++k) t[k] = static_cast<float>(g[k]);
        return _mm_load_ps(t);
    }
}

// Four floats at a time: the scalar loop's operations in its order, each rounded as there (no FMA), so the
// results are the same bits. The compiler does not vectorise the scalar loop itself: std::sqrt may set errno.
template <typename G>
int64_t update_sse(float* w, const G* g, float* m, float* v, int64_t begin, int64_t end, const CpuScalars<float>& s) {
    const __m128 b1 = _mm_set1_ps(s.beta1), omb1 = _mm_set1_ps(s.one_minus_beta1);
    const __m128 b2 = _mm_set1_ps(s.beta2), omb2 = _mm_set1_ps(s.one_minus_beta2);
    const __m128 eps = _mm_set1_ps(s.eps), size = _mm_set1_ps(s.size), decay = _mm_set1_ps(s.decay);
    const __m128 scale = _mm_set1_ps(s.scale);
    int64_t i = begin;
    for (; i + 4 <= end; i += 4) {
        __m128 gi = load4(g + i);
        if (s.scaled) gi = _mm_div_ps(gi, scale);
        const __m128 mi = _mm_add_ps(_mm_mul_ps(b1, _mm_loadu_ps(m + i)), _mm_mul_ps(omb1, gi));
        const __m128 vi = _mm_add_ps(_mm_mul_ps(b2, _mm_loadu_ps(v + i)), _mm_mul_ps(omb2, _mm_mul_ps(gi, gi)));
        const __m128 denom = _mm_add_ps(_mm_sqrt_ps(vi), eps);
        __m128 wi = _mm_sub_ps(_mm_loadu_ps(w + i), _mm_mul_ps(size, _mm_div_ps(mi, denom)));
        if (s.use_decay) wi = _mm_mul_ps(wi, decay);
        _mm_storeu_ps(w + i, wi);
        _mm_storeu_ps(m + i, mi);
        _mm_storeu_ps(v + i, vi);
    }
    return i;
}
#endif

template <typename T, typename G>
void update_cpu(T* w, const G* g, T* m, T* v, int64_t n, const CpuScalars<T>& s) {
    at::parallel_for(0, n, int64_t(1) << 14, [&](int64_t begin, int64_t end) {
#if defined(__SSE2__)
        if constexpr (std::is_same_v<T, float>) begin = update_sse(w, g, m, v, begin, end, s);
#endif
        update_scalar(w, g, m, v, begin, end, s);
    });
}

template <typename T>
void step_tensor_cpu(at::Tensor& p, const at::Tensor& g, at::Tensor& m, at::Tensor& v, const CpuScalars<T>& s) {
    T* w = p.data_ptr<T>();
    T* mp = m.data_ptr<T>();
    T* vp = v.data_ptr<T>();
    const int64_t n = p.numel();
    switch (g.scalar_type()) {
        case at::kHalf:
            update_cpu(w, g.data_ptr<at::Half>(), mp, vp, n, s);
            break;
        case at::kBFloat16:
            update_cpu(w, g.data_ptr<at::BFloat16>(), mp, vp, n, s);
            break;
        default:
            update_cpu(w, g.data_ptr<T>(), mp, vp, n, s);
            break;
    }
}

void check_scalar_tensor(const c10::optional<at::Tensor>& t, const char* name, const at::Device& device) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->defined() && t->numel() == 1 && (t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble),
                "adamw_step_: ", name, " must be a one-element float32 or float64 tensor");
    TORCH_CHECK(t->device() == device, "adamw_step_: ", name, " is on ", t->device(), " but params are on ", device);
}

}  // namespace

void adamw_step_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                 std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> steps, double lr,
                 c10::optional<at::Tensor> lr_tensor, double beta1, double beta2, double eps, double weight_decay,
                 bool correct_bias, c10::optional<at::Tensor> grad_scale, c10::optional<at::Tensor> found_inf) {
    const size_t n = params.size();
    TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
                "adamw_step_: params, grads, exp_avgs, exp_avg_sqs and steps must have one entry per parameter; got ",
                n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), " and ", steps.size());
    TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "adamw_step_: lr must be a finite number >= 0, got ", lr);
    TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
                "adamw_step_: beta1 and beta2 must be in [0, 1), got ", beta1, " and ", beta2);
    TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "adamw_step_: eps must be a finite number >= 0, got ", eps);
    TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0,
                "adamw_step_: weight_decay must be a finite number >= 0, got ", weight_decay);
    if (n == 0) return;
    const at::Device device = params[0].device();
    check_device_supported(params[0], "adamw_step_: params[0]");
    check_scalar_tensor(lr_tensor, "lr", device);
    check_scalar_tensor(grad_scale, "grad_scale", device);
    check_scalar_tensor(found_inf, "found_inf", device);
    std::vector<const void*> written;
    for (size_t i = 0; i < n; ++i) {
        const at::Tensor& p = params[i];
        const at::Tensor& g = grads[i];
        const at::Tensor& m = exp_avgs[i];
        const at::Tensor& v = exp_avg_sqs[i];
        const at::Tensor& s = steps[i];
        TORCH_CHECK(p.defined() && g.defined() && m.defined() && v.defined() && s.defined(), "adamw_step_: params[", i,
                    "], grads[", i, "], exp_avgs[", i, "], exp_avg_sqs[", i, "] and steps[", i, "] must be defined");
        for (const at::Tensor* t : {&g, &m, &v, &s}) {
            TORCH_CHECK(t->device() == device, "adamw_step_: the tensors of parameter ", i, " must be on ", device,
                        ", got one on ", t->device());
        }
        TORCH_CHECK(p.device() == device, "adamw_step_: params[", i, "] is on ", p.device(), " but params[0] is on ",
                    device);
        const at::ScalarType pt = p.scalar_type();
        TORCH_CHECK(pt == at::kFloat || (pt == at::kDouble && p.is_cpu()), "adamw_step_: params[", i,
                    "] must be float32", p.is_cpu() ? " or float64" : "", " on ", p.device(), ", got ", pt);
        const at::ScalarType gt = g.scalar_type();
        TORCH_CHECK(gt == pt || (pt == at::kFloat && (gt == at::kHalf || gt == at::kBFloat16)), "adamw_step_: grads[",
                    i, "] is ", gt, " but params[", i, "] is ", pt,
                    " (float16 or bfloat16 gradients need float32 parameters)");
        TORCH_CHECK(m.scalar_type() == pt && v.scalar_type() == pt, "adamw_step_: exp_avgs[", i, "] and exp_avg_sqs[",
                    i, "] must have the dtype of params[", i, "] (", pt, ")");
        TORCH_CHECK(g.sizes() == p.sizes() && m.sizes() == p.sizes() && v.sizes() == p.sizes(), "adamw_step_: grads[",
                    i, "], exp_avgs[", i, "] and exp_avg_sqs[", i, "] must have the shape of params[", i, "] ",
                    p.sizes());
        TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && m.is_contiguous() && v.is_contiguous(),
                    "adamw_step_: params[", i, "], grads[", i, "], exp_avgs[", i, "] and exp_avg_sqs[", i,
                    "] must be contiguous");
        TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat, "adamw_step_: steps[", i,
                    "] must be a one-element float32 tensor");
        for (const at::Tensor* t : {&p, &m, &v}) {
            if (t->numel() > 0) written.push_back(t->data_ptr());
        }
        written.push_back(s.data_ptr());
    }
    {
        // one element updated from two places would be a race between blocks: every written tensor once
        std::sort(written.begin(), written.end());
        TORCH_CHECK(std::adjacent_find(written.begin(), written.end()) == written.end(),
                    "adamw_step_: the same tensor appears twice among params, exp_avgs, exp_avg_sqs and steps");
    }
#ifdef WITH_CUDA
    if (device.is_cuda()) {
        const c10::cuda::CUDAGuard guard(device);
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
        int sms = 0;
        check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()), "adamw_step_");
        const int64_t tile = adamw_step_tile_elems();
        // one launch pair per gradient dtype and per kMaxAdamWTensors tensors
        for (const at::ScalarType gt : {at::kFloat, at::kHalf, at::kBFloat16}) {
            AdamWStepParams p{};
            p.grad_dtype = launcher_dtype(gt);
            p.lr = static_cast<float>(lr);
            if (lr_tensor.has_value()) {
                p.lr_ptr = lr_tensor->data_ptr();
                p.lr_dtype = launcher_dtype(lr_tensor->scalar_type());
            }
            p.beta1 = static_cast<float>(beta1);
            p.beta2 = static_cast<float>(beta2);
            p.one_minus_beta1 = static_cast<float>(1.0 - beta1);
            p.one_minus_beta2 = static_cast<float>(1.0 - beta2);
            p.log_beta1 = static_cast<float>(std::log(beta1));  // -inf for beta 0: 1 - 0^t = 1
            p.log_beta2 = static_cast<float>(std::log(beta2));
            p.eps = static_cast<float>(eps);
            p.weight_decay = static_cast<float>(weight_decay);
            p.decay = static_cast<float>(1.0 - lr * weight_decay);
            p.correct_bias = correct_bias ? 1 : 0;
            p.use_decay = weight_decay > 0.0 ? 1 : 0;
            if (grad_scale.has_value()) {
                p.grad_scale = grad_scale->data_ptr();
                p.scale_dtype = launcher_dtype(grad_scale->scalar_type());
            }
            if (found_inf.has_value()) {
                p.found_inf = found_inf->data_ptr();
                p.found_inf_dtype = launcher_dtype(found_inf->scalar_type());
            }
            auto flush = [&]() {
                if (p.num_tensors == 0) return;
                const int64_t tiles = p.tile_begin[p.num_tensors];
                const int blocks = static_cast<int>(std::min<int64_t>(std::max<int64_t>(tiles, 1), int64_t(sms) * 8));
                check_launch(launch_adamw_step(p, blocks, stream), "adamw_step_");
                p.num_tensors = 0;
            };
            for (size_t i = 0; i < n; ++i) {
                if (grads[i].scalar_type() != gt) continue;
                const int k = p.num_tensors;
                p.param[k] = params[i].data_ptr<float>();
                p.grad[k] = grads[i].data_ptr();
                p.exp_avg[k] = exp_avgs[i].data_ptr<float>();
                p.exp_avg_sq[k] = exp_avg_sqs[i].data_ptr<float>();
                p.step[k] = steps[i].data_ptr<float>();
                p.numel[k] = params[i].numel();
                p.tile_begin[k + 1] = p.tile_begin[k] + (p.numel[k] + tile - 1) / tile;
                if (++p.num_tensors == kMaxAdamWTensors) flush();
            }
            flush();
        }
        return;
    }
#endif
    // CPU: the flag and the scalars are read here (no device to sync with)
    if (found_inf.has_value() && found_inf->item<double>() != 0.0) return;
    const double lr_v = lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
    const double decay = 1.0 - lr_v * weight_decay;
    const double scale = grad_scale.has_value() ? grad_scale->item<double>() : 1.0;
    for (size_t i = 0; i < n; ++i) {
        float* step = steps[i].data_ptr<float>();
        *step += 1.0f;
        const double t = *step;
        const double size = correct_bias ? lr_v * std::sqrt(1.0 - std::pow(beta2, t)) / (1.0 - std::pow(beta1, t)) : lr_v;
        if (params[i].scalar_type() == at::kDouble) {
            const CpuScalars<double> s{beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, size, decay, scale,
                                       grad_scale.has_value(), weight_decay > 0.0};
            step_tensor_cpu<double>(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], s);
        } else {
            const CpuScalars<float> s{static_cast<float>(beta1),
                                      static_cast<float>(1.0 - beta1),
                                      static_cast<float>(beta2),
                                      static_cast<float>(1.0 - beta2),
                                      static_cast<float>(eps),
                                      static_cast<float>(size),
                                      static_cast<float>(decay),
                                      static_cast<float>(scale),
                                      grad_scale.has_value(),
                                      weight_decay > 0.0};
            step_tensor_cpu<float>(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], s);
        }
    }
}

}  // namespace villa_fast
