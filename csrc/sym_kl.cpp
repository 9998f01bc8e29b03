// sym_kl_fwd: argument checks, the CPU kernel and the dispatch to the CUDA launcher.
//
// For rows of logits a, b [N, C], with p = softmax(a), q = softmax(b), d = log p - log q
// (0 where a_c and b_c are both -inf), Ep = sum_c p_c d_c and Eq = sum_c q_c d_c:
//   L_row = sum_c (p_c - q_c) d_c = Ep - Eq      (= KL(p || q) + KL(q || p))
//   dL_row/da = p (d - Ep) + p - q,   dL_row/db = q (Eq - d) + q - p
// reduced over rows by 1/N (batchmean) or 1/(N*C) (mean).
#if defined(__x86_64__) && defined(__GNUC__)
#define VILLA_FAST_X86_EXP 1
#include <dlfcn.h>
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "common.h"
#include "ops.h"

namespace villa_fast {
namespace {

constexpr int64_t kMaxClasses = 32768;

// exp over a float array in place. glibc's vector exp needs -ffast-math, which would break the -inf
// handling, so the float path borrows SLEEF's AVX2 expf (1 ulp; exp(-inf) = 0, NaN stays NaN, overflow
// gives inf), which libtorch_cpu carries for its own vectorised kernels: looked up on first use, so a torch
// build without it, a CPU without AVX2 and FMA, or VILLA_FAST_SCALAR_EXP=1 takes the scalar loop.
#ifdef VILLA_FAST_X86_EXP
using VecExp = __m256 (*)(__m256);

VecExp find_vec_exp() {
    const char* off = std::getenv("VILLA_FAST_SCALAR_EXP");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return nullptr;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return nullptr;
    return reinterpret_cast<VecExp>(dlsym(RTLD_DEFAULT, "Sleef_expf8_u10avx2"));
}

VecExp vec_exp() {
    static const VecExp f = find_vec_exp();  // thread-safe, once
    return f;
}

__attribute__((target("avx2,fma"))) void exp_avx2(float* x, int64_t n, VecExp f) {
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) _mm256_storeu_ps(x + c, f(_mm256_loadu_ps(x + c)));
    if (c < n) {  // the tail through the same function, so that equal inputs give equal outputs anywhere
        alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::copy(x + c, x + n, tail);
        _mm256_store_ps(tail, f(_mm256_load_ps(tail)));
        std::copy(tail, tail + (n - c), x + c);
    }
}
#endif

void exp_inplace(float* x, int64_t n) {
#ifdef VILLA_FAST_X86_EXP
    if (const VecExp f = vec_exp()) return exp_avx2(x, n, f);
#endif
    for (int64_t c = 0; c < n; ++c) x[c] = std::exp(x[c]);
}

void exp_inplace(double* x, int64_t n) {
    for (int64_t c = 0; c < n; ++c) x[c] = std::exp(x[c]);
}

template <typename T>
void sym_kl_cpu(const T* a, const T* b, T* ga, T* gb, acc_type_t<T>* row_loss, int64_t N, int64_t C,
                acc_type_t<T> f) {
    using acc_t = acc_type_t<T>;
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    const int64_t grain = std::max<int64_t>(1, 16384 / C);
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
        // p, q and d of the current row: the exps are computed once per element and side
        std::vector<acc_t> buf(3 * C);
        acc_t* p = buf.data();
        acc_t* q = p + C;
        acc_t* d = q + C;
        for (int64_t r = begin; r < end; ++r) {
            const T* ar = a + r * C;
            const T* br = b + r * C;
            acc_t ma = kNegInf, mb = kNegInf;
#pragma omp simd reduction(max : ma, mb)
            for (int64_t c = 0; c < C; ++c) {
                ma = std::max(ma, static_cast<acc_t>(ar[c]));
                mb = std::max(mb, static_cast<acc_t>(br[c]));
            }
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                p[c] = static_cast<acc_t>(ar[c]) - ma;
                q[c] = static_cast<acc_t>(br[c]) - mb;
            }
            exp_inplace(p, C);
            exp_inplace(q, C);
            // the row sums in double: over tens of thousands of classes a float sum's rounding would shift
            // every log-probability by its relative error
            double sa = 0, sb = 0;
#pragma omp simd reduction(+ : sa, sb)
            for (int64_t c = 0; c < C; ++c) {
                sa += p[c];
                sb += q[c];
            }
            const acc_t lse_a = static_cast<acc_t>(ma + std::log(sa)), lse_b = static_cast<acc_t>(mb + std::log(sb));
            const acc_t inv_a = static_cast<acc_t>(1.0 / sa), inv_b = static_cast<acc_t>(1.0 / sb);
            // loss = sum (p - q) d directly rather than Ep - Eq: where only one side is -inf the
            // loss is +inf (as in the reference), while 0 * -inf would turn Ep - Eq into NaN
            double ep_sum = 0, eq_sum = 0, loss_sum = 0;  // double, as the row sums above
#pragma omp simd reduction(+ : ep_sum, eq_sum, loss_sum)
            for (int64_t c = 0; c < C; ++c) {
                const acc_t lp = static_cast<acc_t>(ar[c]) - lse_a;
                const acc_t lq = static_cast<acc_t>(br[c]) - lse_b;
                // lp == lq also catches -inf on both sides, where d must be 0 rather than NaN
                d[c] = lp == lq ? acc_t(0) : lp - lq;
                p[c] *= inv_a;
                q[c] *= inv_b;
                ep_sum += p[c] * d[c];
                eq_sum += q[c] * d[c];
                loss_sum += (p[c] - q[c]) * d[c];
            }
            const acc_t ep = static_cast<acc_t>(ep_sum), eq = static_cast<acc_t>(eq_sum);
            row_loss[r] = static_cast<acc_t>(loss_sum);
            T* gar = ga + r * C;
            T* gbr = gb + r * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                gar[c] = static_cast<T>(f * (p[c] * (d[c] - ep) + p[c] - q[c]));
                gbr[c] = static_cast<T>(f * (q[c] * (eq - d[c]) + q[c] - p[c]));
            }
        }
    });
}

// Runs the CPU kernel and reduces the per-row losses in row order (deterministic).
template <typename T>
at::Tensor run_cpu(const at::Tensor& a, const at::Tensor& b, at::Tensor& ga, at::Tensor& gb, int64_t reduction) {
    using acc_t = acc_type_t<T>;
    const int64_t N = a.size(0), C = a.size(1);
    const double divisor = reduction == 0 ? double(N) : double(N) * double(C);
    std::vector<acc_t> row_loss(N);
    sym_kl_cpu<T>(a.data_ptr<T>(), b.data_ptr<T>(), ga.data_ptr<T>(), gb.data_ptr<T>(), row_loss.data(), N, C,
                  static_cast<acc_t>(1.0 / divisor));
    double total = 0;
    for (int64_t r = 0; r < N; ++r) total += static_cast<double>(row_loss[r]);
    const at::ScalarType loss_type = std::is_same_v<T, double> ? at::kDouble : at::kFloat;
    return at::scalar_tensor(total / divisor, a.options().dtype(loss_type));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sym_kl_fwd(const at::Tensor& a, const at::Tensor& b,
                                                          int64_t reduction) {
    TORCH_CHECK(a.defined() && b.defined(), "sym_kl_fwd: a and b must be defined tensors");
    check_device_supported(a, "sym_kl_fwd: a");
    TORCH_CHECK(b.device() == a.device(), "sym_kl_fwd: b is on ", b.device(), " but a is on ", a.device());
    TORCH_CHECK(a.dim() == 2, "sym_kl_fwd: a must have shape [N, C], got ", a.sizes());
    TORCH_CHECK(b.sizes() == a.sizes(), "sym_kl_fwd: b must have the shape of a ", a.sizes(), ", got ", b.sizes());
    TORCH_CHECK(a.size(0) >= 1, "sym_kl_fwd: a must have N >= 1 rows, got shape ", a.sizes());
    TORCH_CHECK(a.size(1) >= 2 && a.size(1) <= kMaxClasses, "sym_kl_fwd: a must have 2 <= C <= ", kMaxClasses,
                " classes, got shape ", a.sizes());
    TORCH_CHECK(b.scalar_type() == a.scalar_type(), "sym_kl_fwd: b must have the dtype of a (", a.scalar_type(),
                "), got ", b.scalar_type());
    const at::ScalarType t = a.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || (t == at::kDouble && a.is_cpu()),
                "sym_kl_fwd: a must be float32, float16 or bfloat16", a.is_cpu() ? " or float64" : "",
                " on ", a.device(), ", got ", t);
    TORCH_CHECK(a.is_contiguous(), "sym_kl_fwd: a must be contiguous");
    TORCH_CHECK(b.is_contiguous(), "sym_kl_fwd: b must be contiguous");
    TORCH_CHECK(reduction == 0 || reduction == 1, "sym_kl_fwd: reduction must be 0 (batchmean) or 1 (mean), got ",
                reduction);

    at::Tensor ga = at::empty_like(a);
    at::Tensor gb = at::empty_like(b);
#ifdef WITH_CUDA
    if (a.is_cuda()) {
        const c10::cuda::CUDAGuard guard(a.device());
        const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.get_device()).stream();
        const int64_t N = a.size(0), C = a.size(1);
        at::Tensor row_loss = at::empty({N}, a.options().dtype(at::kFloat));
        at::Tensor loss = at::empty({}, a.options().dtype(at::kFloat));
        check_launch(launch_sym_kl_fwd(a.data_ptr(), b.data_ptr(), ga.data_ptr(), gb.data_ptr(),
                                       row_loss.data_ptr<float>(), loss.data_ptr<float>(), launcher_dtype(t), N, C,
                                       static_cast<int32_t>(reduction), stream),
                     "sym_kl_fwd");
        return {loss, ga, gb};
    }
#endif
    // dtype dispatch, in one place
    at::Tensor loss;
    switch (t) {
        case at::kDouble:
            loss = run_cpu<double>(a, b, ga, gb, reduction);
            break;
        case at::kHalf:
            loss = run_cpu<at::Half>(a, b, ga, gb, reduction);
            break;
        case at::kBFloat16:
            loss = run_cpu<at::BFloat16>(a, b, ga, gb, reduction);
            break;
        default:
            loss = run_cpu<float>(a, b, ga, gb, reduction);
            break;
    }
    return {loss, ga, gb};
}

}  // namespace villa_fast
