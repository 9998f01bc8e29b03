"""Word-region alignment by optimal transport (UNITER's ITM-OT term).

The transport plan comes from the inexact proximal point method (IPOT, Xie et al. 2019) on the
cosine-distance cost, with no gradient through the plan; the distance is <C, T> and its gradient
flows through the cost only. Run it in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_cost(x: Tensor, y: Tensor, eps: float = 1e-5) -> Tensor:
    """1 - cos(x_i, y_j). x [B, M, D], y [B, N, D] -> [B, M, N]."""
    xn = F.normalize(x, p=2, dim=-1, eps=eps)
    yn = F.normalize(y, p=2, dim=-1, eps=eps)
    return 1.0 - torch.bmm(xn, yn.transpose(1, 2))


@torch.no_grad()
def ipot_plan(
    cost: Tensor,
    x_pad: Tensor,
    y_pad: Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner: int = 1,
) -> Tensor:
    """IPOT transport plan between uniform marginals over the valid positions.

    Args:
        cost: [B, M, N] cost matrix (padded entries are ignored).
        x_pad: [B, M] bool, True at padding of the first set.
        y_pad: [B, N] bool, True at padding of the second set.
        beta: proximal step size; iterations: outer steps; inner: Sinkhorn steps per outer step.
    Returns:
        T: [B, N, M] (the plan transposed, zero at padded pairs).
    """
    b, m, n = cost.shape
    dtype = cost.dtype
    x_len = (~x_pad).sum(1).to(dtype)  # [B]
    y_len = (~y_pad).sum(1).to(dtype)
    pad = (x_pad.unsqueeze(-1) | y_pad.unsqueeze(-2)).transpose(1, 2)  # [B, N, M]
    kernel = torch.exp(-cost.transpose(1, 2) / beta).masked_fill(pad, 0.0)  # [B, N, M]
    plan = torch.ones(b, n, m, dtype=dtype, device=cost.device).masked_fill(pad, 0.0)
    sigma = (1.0 / x_len).unsqueeze(1).expand(b, m).masked_fill(x_pad, 0.0).unsqueeze(-1)  # [B, M, 1]
    # a large constant at padding makes the scaling factors there ~0 instead of inf
    x_big = (x_pad.to(dtype) * 1e4).unsqueeze(1)  # [B, 1, M]
    y_big = (y_pad.to(dtype) * 1e4).unsqueeze(1)  # [B, 1, N]
    xl = x_len.view(b, 1, 1)
    yl = y_len.view(b, 1, 1)
    delta = None
    for _ in range(iterations):
        q = kernel * plan
        for _ in range(inner):
            delta = 1.0 / (yl * torch.bmm(q, sigma).view(b, 1, n) + y_big)  # [B, 1, N]
            sigma = (1.0 / (xl * torch.bmm(delta, q) + x_big)).view(b, m, 1)  # [B, M, 1]
        plan = delta.view(b, n, 1) * q * sigma.view(b, 1, m)
    return plan.masked_fill(pad, 0.0)


def optimal_transport_dist(
    txt_emb: Tensor,
    img_emb: Tensor,
    txt_pad: Tensor,
    img_pad: Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner: int = 1,
) -> Tensor:
    """OT distance per example. txt_emb [B, M, D], img_emb [B, N, D], pads [B, M] / [B, N] bool -> [B]."""
    cost = cosine_cost(txt_emb, img_emb)
    joint_pad = txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2)
    cost = cost.masked_fill(joint_pad, 0.0)
    plan = ipot_plan(cost.detach(), txt_pad, img_pad, beta, iterations, inner)  # [B, N, M]
    # trace(C @ T) = sum_ij C_ij T_ji
    return (cost * plan.transpose(1, 2)).sum(dim=(1, 2))
