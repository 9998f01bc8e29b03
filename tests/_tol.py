"""Tolerances that travel with the dtype (and the backend's math precision)."""

import torch

# (atol, rtol) per input dtype for backends that compute in the input's precision class
TOL = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def tol(dtype: torch.dtype, backend: str) -> tuple[float, float]:
    if dtype == torch.float64 and backend == "triton":
        return TOL[torch.float32]  # the Triton kernels compute in float32
    return TOL[dtype]
