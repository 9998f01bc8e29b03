// The ops of villa_fast._C as seen by the bindings. Each is defined in csrc/<op>.cpp,
// which checks its arguments and dispatches to the CPU kernel or the CUDA launcher.
#pragma once

#include <cstdint>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace villa_fast {

// In place: delta[r] += lr * g / max(||g||, 1e-8) with g = grad / grad_scale, then projection.
// Returns int64 [len(deltas)]: rows skipped per tensor because their gradient was not finite.
at::Tensor perturb_update_(std::vector<at::Tensor> deltas, std::vector<at::Tensor> grads, std::vector<double> lrs,
                           int64_t norm_type, double max_norm, c10::optional<at::Tensor> grad_scale);

// In place: scales uniform(-1, 1) noise [B, P, D] into the initial perturbation; returns noise.
at::Tensor perturb_init_(at::Tensor noise, c10::optional<at::Tensor> mask, double init_mag, int64_t norm_type);

// Symmetric KL between softmax(a) and softmax(b), rows of [N, C]: (loss, grad_a, grad_b).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sym_kl_fwd(const at::Tensor& a, const at::Tensor& b,
                                                          int64_t reduction);

// In place: accs[i] += vals[i] for every pair when the one-element bool tensor ok is true; nothing is
// read or written otherwise. One launch per dtype and per 40 tensors on CUDA; no host sync there.
void add_if_(std::vector<at::Tensor> accs, std::vector<at::Tensor> vals, const at::Tensor& ok);

// In place: one step of the authors' AdamW rule for every parameter (params, exp_avgs, exp_avg_sqs and the
// one-element float32 steps advanced by one); lr from lr_tensor when given; gradients divided by grad_scale
// when given; nothing changes when found_inf is non-zero. One launch pair per 64 tensors on CUDA, no host sync.
void adamw_step_(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                 std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> steps, double lr,
                 c10::optional<at::Tensor> lr_tensor, double beta1, double beta2, double eps, double weight_decay,
                 bool correct_bias, c10::optional<at::Tensor> grad_scale, c10::optional<at::Tensor> found_inf);

}  // namespace villa_fast
