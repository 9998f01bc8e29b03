// Python bindings of villa_fast._C. The only file that includes torch/extension.h (the slow
// header to compile); each op lives in its own csrc/<op>.cpp built from ATen headers.
#include <torch/extension.h>

#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "Compiled kernels of villa_fast: C++ CPU kernels, and CUDA kernels when built with CUDA.";

#ifdef WITH_CUDA
    m.attr("with_cuda") = true;
#else
    m.attr("with_cuda") = false;
#endif

    m.def("perturb_update_", &villa_fast::perturb_update_, py::arg("deltas"), py::arg("grads"), py::arg("lrs"),
          py::arg("norm_type"), py::arg("max_norm"), py::arg("grad_scale") = py::none(),
          py::call_guard<py::gil_scoped_release>(),
          R"doc(In-place normalised ascent step on the perturbations, one launch for all tensors.

Args:
    deltas: list of contiguous float32 tensors [B_i, ...] (float64 on the CPU); row r = dim 0.
    grads: gradients of the same shapes and device; float32, float16 or bfloat16
        (float64 with a float64 delta).
    lrs: one step size >= 0 per tensor.
    norm_type: 0 = l2, 1 = linf.
    max_norm: projection radius; 0 disables the projection.
    grad_scale: None or a 1-element float32/float64 tensor on the same device (the loss scale);
        g = grad / grad_scale. Read on the device: no host sync.

Per row, with g = grad[r] / grad_scale: rows with a non-finite g are left unchanged;
otherwise delta[r] += lr * g / max(||g||, 1e-8), then for max_norm > 0 the l2 update rescales
rows with ||delta[r]||_2 > max_norm to max_norm and the linf update clamps to +-max_norm.

Returns:
    int64 tensor [len(deltas)] on the deltas' device: skipped rows per tensor.)doc");

    m.def("perturb_init_", &villa_fast::perturb_init_, py::arg("noise"), py::arg("mask"), py::arg("init_mag"),
          py::arg("norm_type"), py::call_guard<py::gil_scoped_release>(),
          R"doc(Scales uniform(-1, 1) noise in place into the initial perturbation; returns noise.

Args:
    noise: contiguous float32/float64 [B, P, D] of uniform(-1, 1) draws.
    mask: None or a contiguous [B, P] tensor of noise's dtype (1 = valid position).
    init_mag: magnitude >= 0.
    norm_type: 0 = l2: noise *= mask * init_mag / sqrt(len_b * D), len_b = sum_p mask[b]
        (examples with len_b == 0 become zeros); 1 = linf: noise *= mask * init_mag.)doc");

    m.def("add_if_", &villa_fast::add_if_, py::arg("accs"), py::arg("vals"), py::arg("ok"),
          py::call_guard<py::gil_scoped_release>(),
          R"doc(In place: accs[i] += vals[i] for every pair when ok is true; nothing is read or written otherwise.

Args:
    accs, vals: lists of the same length; pair i has one shape and dtype (float32, float16,
        bfloat16; float64 on the CPU), both contiguous, on ok's device; no tensor twice in accs.
    ok: one-element bool tensor, read on the device (no host sync on CUDA).

Sums are computed in float (double for float64) and rounded to the tensor type. On CUDA one
launch covers up to 40 tensors of a dtype.)doc");

    m.def("sym_kl_fwd", &villa_fast::sym_kl_fwd, py::arg("a"), py::arg("b"), py::arg("reduction"),
          py::call_guard<py::gil_scoped_release>(),
          R"doc(Symmetric KL between softmax(a) and softmax(b) and both gradients, in one pass.

Args:
    a, b: contiguous logits [N, C], same dtype (float32, float16, bfloat16; float64 on the CPU)
        and device, N >= 1, 2 <= C <= 32768.
    reduction: 0 = batchmean (sum over classes, mean over rows), 1 = mean over all elements.

L_row = sum_c (p_c - q_c)(log p_c - log q_c) = KL(p||q) + KL(q||p), p = softmax(a), q = softmax(b);
classes where both logits are -inf contribute 0.

Returns:
    (loss, grad_a, grad_b): loss a 0-dim float32 tensor (float64 for float64 input), the
    gradients of loss in the input dtype, shape [N, C]. Deterministic.)doc");

    m.def("adamw_step_", &villa_fast::adamw_step_, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
          py::arg("exp_avg_sqs"), py::arg("steps"), py::arg("lr"), py::arg("lr_tensor"), py::arg("beta1"),
          py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("correct_bias"),
          py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(),
          py::call_guard<py::gil_scoped_release>(),
          R"doc(In place: one step of the authors' AdamW rule over many parameters; no host sync on CUDA.

Args:
    params: contiguous float32 tensors (float64 on the CPU), updated in place.
    grads: one per parameter, same shape and device; the parameter's dtype, or float16/bfloat16
        with float32 parameters. Not modified.
    exp_avgs, exp_avg_sqs: the moments, the parameter's shape and dtype, updated in place.
    steps: one-element float32 tensors, the per-parameter step counts, advanced by one first.
    lr: the learning rate, used when lr_tensor is None.
    lr_tensor: None or a one-element float32/float64 tensor on the device (read there).
    beta1, beta2, eps, weight_decay, correct_bias: as in villa_fast.train.optim.AdamW.
    grad_scale: None or a one-element float32/float64 tensor: g = grad / grad_scale.
    found_inf: None or a one-element float32/float64 tensor: when non-zero nothing at all changes.

With t the advanced step: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps) (lr alone without correct_bias);
then p *= 1 - lr * weight_decay. Math in float (double for float64); no tensor twice among the
written ones. On CUDA one launch pair covers up to 64 tensors of a gradient dtype.)doc");
}
