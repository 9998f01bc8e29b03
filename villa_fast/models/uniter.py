"""UNITER: a single-stream transformer over word pieces and detected image regions.

Where VILLA's perturbations enter (the adversarial step attaches hooks to these two modules):

- ``embeddings.word_embeddings`` (``nn.Embedding``): a forward hook adds the text perturbation
  ``[B, L_txt, H]`` to its output, before position/type embeddings and the LayerNorm;
- ``img_embeddings.img_linear`` (``nn.Linear(img_dim, H)``): the image perturbation ``[B, N, img_dim]``
  perturbs its input, after the MRM mask embedding; as the module is a Linear the product is split, ``W delta``
  added to its output (``villa_fast.adversarial.hooks``: the same function, the perturbation kept from being
  rounded against the features).

Both modules are always *called* (never bypassed through their weights) so the hooks fire.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .config import UniterConfig, as_config
from .layers import EncoderLayer, Pooler, attention_bias, init_weights, make_layer_norm


def _embedding_precision(config: UniterConfig, x: Tensor):
    """Leave autocast for the embedding block when ``fp32_embeddings`` is set (see UniterConfig)."""
    dev = x.device.type
    if config.fp32_embeddings and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


class UniterTextEmbeddings(nn.Module):
    """LN(word + position + type) -> dropout."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.LayerNorm = make_layer_norm(h, config.layer_norm_eps, config.layer_norm_impl)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, position_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """input_ids [B, L] long; position_ids [1 or B, L] long; token_type_ids [B, L] (default 0)."""
        words = self.word_embeddings(input_ids)
        pos = self.position_embeddings(position_ids)
        if token_type_ids is None:
            # type 0 for every token: one row broadcast, no [B, L] index tensor
            typ = self.token_type_embeddings.weight[0]
        else:
            typ = self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(words + pos + typ))


class UniterImageEmbeddings(nn.Module):
    """LN( LN(img_linear(feat [+ mask emb])) + LN(pos_linear(box)) + type ) -> dropout."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        h, eps, ln = config.hidden_size, config.layer_norm_eps, config.layer_norm_impl
        self.img_linear = nn.Linear(config.img_dim, h)
        self.img_layer_norm = make_layer_norm(h, eps, ln)
        self.pos_layer_norm = make_layer_norm(h, eps, ln)
        self.pos_linear = nn.Linear(config.pos_dim, h)
        # row 0 = "not masked" (always treated as zero), row 1 = the learned MRM mask embedding
        self.mask_embedding = nn.Embedding(2, config.img_dim, padding_idx=0)
        self.LayerNorm = make_layer_norm(h, eps, ln)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, img_feat: Tensor, img_pos_feat: Tensor, type_embeddings: Tensor, img_masks: Tensor | None = None
    ) -> Tensor:
        """img_feat [B, N, img_dim]; img_pos_feat [B, N, pos_dim]; type_embeddings [B, N, H] or [H];
        img_masks [B, N] (1/True = masked region) or None.

        ``img_feat`` may come in any floating dtype, float16 as the img_db stores it (the loader does not widen
        it): it is widened here, once, to the projection weight's dtype, before the mask embedding is added and
        before ``img_linear``, whose input (where the adversarial image perturbation enters) is therefore in the
        weight's dtype (float32), as if the loader had widened it."""
        w = self.img_linear.weight
        if img_feat.dtype != w.dtype:
            img_feat = img_feat.to(w.dtype)
        if img_pos_feat.dtype != w.dtype:
            img_pos_feat = img_pos_feat.to(w.dtype)
        if img_masks is not None:
            # same as looking up mask_embedding with row 0 zeroed, without writing into the weight
            img_feat = img_feat + img_masks.unsqueeze(-1).to(img_feat.dtype) * self.mask_embedding.weight[1]
        im = self.img_layer_norm(self.img_linear(img_feat))
        pos = self.pos_layer_norm(self.pos_linear(img_pos_feat))
        return self.dropout(self.LayerNorm(im + pos + type_embeddings))


def _run_layer(layer: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    return layer(x, mask)


# one compiled runner per set of torch.compile options, shared by every layer of every model: the layers
# have the same code and parameter shapes, so they share one compiled graph (parameters are its inputs)
_COMPILED_RUNNERS: dict[tuple, Callable[[nn.Module, Tensor, Tensor], Tensor]] = {}


def _compiled_runner(options: dict[str, Any]) -> Callable[[nn.Module, Tensor, Tensor], Tensor]:
    key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    fn = _COMPILED_RUNNERS.get(key)
    if fn is None:
        fn = _COMPILED_RUNNERS[key] = torch.compile(_run_layer, **options)
    return fn


class UniterEncoder(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.impl = config.attn_impl
        self.layer = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        # torch.compile options for the layers (UniterModel.compile_layers), None = eager
        self.compile_options: dict[str, Any] | None = None

    def forward(self, x: Tensor, attn_masks: Tensor) -> Tensor:
        """x [B, L, H]; attn_masks [B, L] (1 = valid). Returns the last layer's output."""
        # the official additive -10000 mask, built once in the dtype attention runs in
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        mask = attention_bias(attn_masks, dtype)
        run = _run_layer if self.compile_options is None else _compiled_runner(self.compile_options)
        for layer in self.layer:
            x = run(layer, x, mask)
        return x


class UniterModel(nn.Module):
    """UNITER encoder. ``forward`` returns the sequence output [B, L, H]; ``pooler`` is applied by heads."""

    def __init__(self, config: UniterConfig | dict | str):
        super().__init__()
        config = as_config(config)
        self.config = config
        self.embeddings = UniterTextEmbeddings(config)
        self.img_embeddings = UniterImageEmbeddings(config)
        self.encoder = UniterEncoder(config)
        self.pooler = Pooler(config)
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def compile_layers(self, enabled: bool = True, **options: Any) -> UniterModel:
        """Run every encoder layer through ``torch.compile(**options)`` (``enabled=False`` goes back to eager).

        Only the encoder layers are compiled: the embedding block, where the adversarial step's hooks add
        the perturbations, stays eager, so :class:`~villa_fast.adversarial.VillaStep` and
        :class:`~villa_fast.adversarial.GraphedVillaStep` work unchanged (the compiled kernels are
        captured in the step's CUDA graph; leave ``mode`` at its default, whose kernels need no CUDA
        graphs of their own). All layers share one compiled graph, so compiling costs one layer's
        forward and backward per input shape. The choice is not part of the weights or the config:
        ``copy.deepcopy`` keeps it, ``state_dict`` does not see it. Returns ``self``.
        """
        if not enabled:
            self.encoder.compile_options = None
            return self
        if "mode" in options and options["mode"] in ("reduce-overhead", "max-autotune"):
            raise ValueError(
                f"compile_layers: mode={options['mode']!r} records CUDA graphs of its own, which cannot be "
                "captured inside GraphedVillaStep's graph; use the default mode or 'max-autotune-no-cudagraphs'"
            )
        self.encoder.compile_options = dict(options)
        return self

    # -- embeddings ------------------------------------------------------------------------------
    def txt_embeddings(self, input_ids: Tensor, position_ids: Tensor, txt_type_ids: Tensor | None = None) -> Tensor:
        with _embedding_precision(self.config, input_ids):
            return self.embeddings(input_ids, position_ids, txt_type_ids)

    def img_embeddings_of(
        self,
        img_feat: Tensor,
        img_pos_feat: Tensor,
        img_masks: Tensor | None = None,
        img_type_ids: Tensor | None = None,
    ) -> Tensor:
        types = self.embeddings.token_type_embeddings
        with _embedding_precision(self.config, img_feat):
            # regions have type 1 unless told otherwise (NLVR2: 1 left image, 2 right image)
            type_emb = types.weight[1] if img_type_ids is None else types(img_type_ids)
            return self.img_embeddings(img_feat, img_pos_feat, type_emb, img_masks)

    def joint_embeddings(
        self,
        input_ids: Tensor | None,
        position_ids: Tensor | None,
        img_feat: Tensor | None,
        img_pos_feat: Tensor | None,
        gather_index: Tensor | None = None,
        txt_type_ids: Tensor | None = None,
        img_type_ids: Tensor | None = None,
        img_masks: Tensor | None = None,
    ) -> Tensor:
        """The encoder input [B, L, H]: text, image, or both packed by ``gather_index``."""
        if input_ids is None and img_feat is None:
            raise ValueError("UniterModel needs input_ids, img_feat or both")
        if img_feat is None:
            return self.txt_embeddings(input_ids, position_ids, txt_type_ids)
        img = self.img_embeddings_of(img_feat, img_pos_feat, img_masks, img_type_ids)
        if input_ids is None:
            return img
        txt = self.txt_embeddings(input_ids, position_ids, txt_type_ids)
        if img.dtype != txt.dtype:  # fp32_embeddings=False under autocast
            img = img.to(txt.dtype)
        both = torch.cat([txt, img], dim=1)
        if gather_index is None:
            return both
        # each row becomes [its txt tokens, its regions, padding]: drop the text padding in between
        idx = gather_index.unsqueeze(-1).expand(-1, -1, both.size(-1))
        return torch.gather(both, 1, idx)

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None,
        position_ids: Tensor | None,
        img_feat: Tensor | None,
        img_pos_feat: Tensor | None,
        attn_masks: Tensor,
        gather_index: Tensor | None = None,
        txt_type_ids: Tensor | None = None,
        img_type_ids: Tensor | None = None,
        img_masks: Tensor | None = None,
    ) -> Tensor:
        """Sequence output of the last layer.

        Args:
            input_ids: [B, L_txt] long word-piece ids (with CLS/SEP), or None for image only.
            position_ids: [1, L_txt] or [B, L_txt] long.
            img_feat: [B, N, img_dim] region features (float16 as stored is fine: widened before the image
                projection), or None for text only.
            img_pos_feat: [B, N, pos_dim] box features.
            attn_masks: [B, L] (1 = valid, 0 = padding), L = gather_index.size(1) when packed,
                else L_txt + N.
            gather_index: [B, L] long indices into cat([text, image], dim=1), or None.
            txt_type_ids: [B, L_txt] long (VCR: 0 question, 2 answer, 3 rationale), default 0.
            img_type_ids: [B, N] long (NLVR2: 1 / 2), default 1.
            img_masks: [B, N] bool/0-1, regions replaced by the MRM mask embedding.
        Returns:
            [B, L, H].
        """
        x = self.joint_embeddings(
            input_ids, position_ids, img_feat, img_pos_feat, gather_index, txt_type_ids, img_type_ids, img_masks
        )
        if attn_masks.shape != x.shape[:2]:
            raise ValueError(f"attn_masks has shape {tuple(attn_masks.shape)}, expected {tuple(x.shape[:2])}")
        return self.encoder(x, attn_masks)

    # -- embedding resizing (task models) --------------------------------------------------------
    @torch.no_grad()
    def resize_embedding(self, name: str, num: int, copy_rows: dict[int, int] | None = None) -> None:
        """Grow ``embeddings.<name>`` to ``num`` rows in place.

        The module object is kept (hooks stay attached); only its weight is replaced. New rows are
        initialised N(0, initializer_range), then ``copy_rows`` {new_row: source_row} copies rows.
        """
        emb: nn.Embedding = getattr(self.embeddings, name)
        old = emb.weight
        if num < old.size(0):
            raise ValueError(f"cannot shrink embeddings.{name} from {old.size(0)} to {num} rows")
        if num == old.size(0) and not copy_rows:
            return
        new = old.new_empty(num, old.size(1)).normal_(0.0, self.config.initializer_range)
        new[: old.size(0)] = old
        for dst, src in (copy_rows or {}).items():
            new[dst] = new[src]
        emb.weight = nn.Parameter(new, requires_grad=old.requires_grad)
        emb.num_embeddings = num
        if name == "word_embeddings":
            self.config = self.config.replace(vocab_size=num)
        elif name == "token_type_embeddings":
            self.config = self.config.replace(type_vocab_size=num)
