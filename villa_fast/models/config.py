"""UNITER model configuration, read from the official JSON model configs.

The official files (``config/uniter-base.json``, ``uniter-large.json``) hold BERT's keys only;
``img_dim`` and ``pos_dim`` are the region-feature and box-feature widths (2048 and 7 for the
released Faster R-CNN features). The remaining fields choose implementation details that never
change the model's mathematics (attention kernel, LayerNorm kernel, embedding precision).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

_ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "swish", "silu")
_ATTN_IMPLS = ("sdpa", "plain")
_LAYER_NORM_IMPLS = ("auto", "torch", "apex", "fused")

# Keys that Hugging Face BERT configs (and configs exported by other UNITER forks) carry and that
# do not change the model defined here. Anything else unknown is an error, so a typo or an
# unsupported architecture option never passes silently.
_HARMLESS_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "model_type",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "gradient_checkpointing",
        "use_cache",
        "output_past",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "classifier_dropout",
        "directionality",
        "id2label",
        "label2id",
        "num_labels",
        "finetuning_task",
        "problem_type",
        "pooler_fc_size",
        "pooler_num_attention_heads",
        "pooler_num_fc_layers",
        "pooler_size_per_head",
        "pooler_type",
        "chunk_size_feed_forward",
        "tie_word_embeddings",
        "is_decoder",
        "add_cross_attention",
        "position_embedding_type",
    }
)
# Harmless keys whose value must still be the one this model implements.
_REQUIRED_VALUES = {"position_embedding_type": ("absolute",), "is_decoder": (False,), "add_cross_attention": (False,)}


@dataclass
class UniterConfig:
    """Hyper-parameters of a UNITER encoder.

    BERT keys (as in the official JSON files): ``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``intermediate_size``, ``hidden_act``, ``hidden_dropout_prob``,
    ``attention_probs_dropout_prob``, ``max_position_embeddings``, ``type_vocab_size``,
    ``initializer_range``, ``layer_norm_eps``.

    Image input: ``img_dim`` region-feature width (2048), ``pos_dim`` box-feature width (7:
    x1, y1, x2, y2, w, h, w*h).

    Implementation (same outputs whichever is chosen, up to rounding; apex's under autocast aside):
      ``attn_impl``: ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"plain"`` (matmul-softmax).
      ``layer_norm_impl``: ``"auto"`` / ``"torch"`` (``nn.LayerNorm``), ``"fused"`` (the residual add
      of each encoder layer fused into its LayerNorm, :func:`villa_fast.ops.add_layer_norm`; a Triton
      kernel on CUDA, plain PyTorch elsewhere; same parameter names), both float32 under autocast, or
      ``"apex"`` (NVIDIA apex FusedLayerNorm, an error if apex is missing; under autocast it computes
      and returns half precision, as the authors' apex O2 runs).
      ``fp32_embeddings``: compute the embedding sums, their LayerNorms and the image linear layer
      outside autocast, in the parameters' dtype, so that tiny adversarial perturbations added to
      the word embeddings or raw region features are not rounded away by a bf16/fp16 cast.
    """

    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    img_dim: int = 2048
    pos_dim: int = 7
    attn_impl: str = "sdpa"
    layer_norm_impl: str = "auto"
    fp32_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
            "img_dim",
            "pos_dim",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"UniterConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"UniterConfig.hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            p = getattr(self, name)
            if not 0.0 <= float(p) < 1.0:
                raise ValueError(f"UniterConfig.{name} must be in [0, 1), got {p!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"UniterConfig.hidden_act {self.hidden_act!r} is not supported; choose one of {_ACTIVATIONS}"
            )
        if self.attn_impl not in _ATTN_IMPLS:
            raise ValueError(f"UniterConfig.attn_impl must be one of {_ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.layer_norm_impl not in _LAYER_NORM_IMPLS:
            raise ValueError(
                f"UniterConfig.layer_norm_impl must be one of {_LAYER_NORM_IMPLS}, got {self.layer_norm_impl!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def base(cls, **overrides: Any) -> UniterConfig:
        """UNITER-base: 12 layers, hidden 768, 12 heads, FFN 3072, cased vocabulary of 28996."""
        return cls(**overrides)

    @classmethod
    def large(cls, **overrides: Any) -> UniterConfig:
        """UNITER-large: 24 layers, hidden 1024, 16 heads, FFN 4096."""
        values = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UniterConfig:
        """Build from a dict with the official keys (plus this class's own fields).

        Raises ``ValueError`` naming the key for an unknown key, and for a known harmless key
        whose value asks for something this model does not implement.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in fields:
                kwargs[key] = value
            elif key in _HARMLESS_KEYS:
                allowed = _REQUIRED_VALUES.get(key)
                if allowed is not None and value not in allowed:
                    raise ValueError(f"config key {key!r}={value!r} is not supported (expected one of {allowed})")
            else:
                raise ValueError(f"unknown UNITER config key {key!r}")
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> UniterConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> UniterConfig:
        return dataclasses.replace(self, **changes)


def as_config(config: UniterConfig | dict | str | os.PathLike) -> UniterConfig:
    """Accept a config object, a dict, a JSON path, or the names ``"base"`` / ``"large"``."""
    if isinstance(config, UniterConfig):
        return config
    if isinstance(config, dict):
        return UniterConfig.from_dict(config)
    if isinstance(config, str) and config in ("base", "large"):
        return UniterConfig.base() if config == "base" else UniterConfig.large()
    if isinstance(config, (str, os.PathLike)):
        return UniterConfig.from_json_file(config)
    raise TypeError(f"expected a UniterConfig, dict, JSON path, 'base' or 'large'; got {type(config).__name__}")
