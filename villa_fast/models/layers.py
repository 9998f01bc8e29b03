"""Building blocks of the UNITER encoder: LayerNorm choice, activations, the post-LN BERT layer.

Parameter names follow the official checkpoints (``attention.output.LayerNorm``,
``intermediate.dense``, ...) except that the query, key and value projections are one fused
``attention.self.qkv`` linear layer (weight ``[3H, H]``, rows in query, key, value order); the
checkpoint loader fuses and splits them.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from villa_fast.ops import add_layer_norm

from .config import _LAYER_NORM_IMPLS, UniterConfig

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _apex_fused_layer_norm() -> type[nn.Module] | None:
    """NVIDIA apex's FusedLayerNorm class, or None.

    The unrelated PyPI package that is also named ``apex`` has no ``apex.normalization``; the
    subclass check keeps any other look-alike out as well.
    """
    try:
        from apex.normalization import FusedLayerNorm  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or a broken build raising at import
        log.debug("NVIDIA apex FusedLayerNorm unavailable: %r", exc)
        return None
    if not (isinstance(FusedLayerNorm, type) and issubclass(FusedLayerNorm, nn.Module)):
        return None
    return FusedLayerNorm


class FusedAddLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that can also take the residual: ``forward_add(x, residual)`` is
    ``LayerNorm(x + residual)`` in one fused op (:func:`villa_fast.ops.add_layer_norm`).

    ``forward(x)`` is the ordinary LayerNorm; parameters are ``weight`` and ``bias`` as in
    ``nn.LayerNorm``, so checkpoints load unchanged. ``forward_add`` is a method call, so module
    hooks registered on this LayerNorm do not see it.
    """

    def forward_add(self, x: Tensor, residual: Tensor) -> Tensor:
        """x, residual: [..., H] -> [..., H] of dtype promote_types(x, residual) (float32 under autocast)."""
        if self.weight is None or len(self.normalized_shape) != 1:
            return self(x + residual)
        if torch.is_autocast_enabled(x.device.type) and residual.dtype != torch.float32:
            # autocast runs layer_norm in float32 and returns float32: keep that contract
            residual = residual.float()
        return add_layer_norm(x, residual, self.weight, self.bias, self.eps)


def make_layer_norm(size: int, eps: float, impl: str = "auto") -> nn.Module:
    """A LayerNorm with ``weight``/``bias`` parameters.

    ``"auto"`` and ``"torch"`` give ``nn.LayerNorm`` (float32 under autocast, as torch's autocast runs
    layer_norm); ``impl="fused"`` a :class:`FusedAddLayerNorm` (the residual add fused in where the caller
    uses ``forward_add``, float32 likewise); ``"apex"`` NVIDIA apex's FusedLayerNorm, which under autocast
    computes and returns the autocast dtype (half-precision LayerNorm outputs and residual stream, as the
    authors' apex O2 runs: not the float32 the others keep, hence only on request). ``VILLA_FAST_LAYERNORM``
    (``torch`` / ``apex`` / ``fused``) overrides ``impl`` when set.
    """
    impl = os.environ.get("VILLA_FAST_LAYERNORM", impl) or "auto"
    if impl not in _LAYER_NORM_IMPLS:
        raise ValueError(f"unknown LayerNorm implementation {impl!r} (VILLA_FAST_LAYERNORM or layer_norm_impl)")
    if impl in ("auto", "torch"):
        return nn.LayerNorm(size, eps=eps)
    if impl == "fused":
        return FusedAddLayerNorm(size, eps=eps)
    apex_ln = _apex_fused_layer_norm()
    if apex_ln is None:
        raise RuntimeError(
            "layer_norm_impl='apex' needs NVIDIA apex built from source (github.com/NVIDIA/apex); "
            "apex.normalization.FusedLayerNorm could not be imported"
        )
    return apex_ln(size, eps=eps)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def activation(name: str):
    """The FFN activation by its config name (``gelu`` is the exact erf form, as in BERT/UNITER)."""
    table = {
        "gelu": F.gelu,
        "relu": F.relu,
        "gelu_new": _gelu_tanh,
        "gelu_pytorch_tanh": _gelu_tanh,
        "swish": F.silu,
        "silu": F.silu,
    }
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}") from None


def attention_bias(attn_masks: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask ``[B, 1, 1, L]``: 0 where ``attn_masks`` is 1, -10000 where it is 0 (as in UNITER)."""
    m = attn_masks[:, None, None, :].to(dtype)
    return (1.0 - m) * -10000.0


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (``attention.self``)."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.impl = config.attn_impl
        self.dropout_p = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(h, 3 * h)
        self.dropout = nn.Dropout(self.dropout_p)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: [B, L, H]; mask: additive bias [B, 1, 1, L] (0 valid, -10000 padding).

        Returns the context [B, L, H] (before the output projection).
        """
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.impl == "sdpa":
            if mask.dtype != q.dtype:
                mask = mask.to(q.dtype)
            ctx = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0
            )
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            scores = scores + mask.to(scores.dtype)
            ctx = torch.matmul(self.dropout(scores.softmax(dim=-1)), v)
        return ctx.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)


class _DenseLayerNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): BERT's ``attention.output`` and ``output``.

    With ``layer_norm_impl="fused"`` the add and the LayerNorm run as one op (same parameters).
    """

    def __init__(self, d_in: int, d_out: int, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = make_layer_norm(d_out, config.layer_norm_eps, config.layer_norm_impl)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        if isinstance(self.LayerNorm, FusedAddLayerNorm):
            return self.LayerNorm.forward_add(self.dropout(self.dense(x)), residual)
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.self = SelfAttention(config)
        self.output = _DenseLayerNorm(config.hidden_size, config.hidden_size, config)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer (BERT)."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = _DenseLayerNorm(config.intermediate_size, config.hidden_size, config)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class Pooler(nn.Module):
    """tanh(Linear(h_CLS))."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


def init_weights(module: nn.Module, std: float) -> None:
    """BERT initialisation: N(0, std) for linear and embedding weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm) or type(module) is _apex_fused_layer_norm():
        if getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
