"""Loading official UNITER/VILLA checkpoints and Hugging Face BERT weights; saving in safetensors.

Official checkpoints are torch state dicts whose keys start with ``uniter.`` (older ones ``bert.``),
with LayerNorm parameters possibly named ``gamma``/``beta`` and separate ``query``/``key``/``value``
projections; fine-tuned ones carry their head (``vqa_output.*``, ``nlvr2_output.*``, ...) and may
have grown type/word embeddings (NLVR2: 3 types; VCR: 4 types and 81 extra tokens).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .uniter import UniterModel

_ENCODER_ROOTS = ("embeddings.", "img_embeddings.", "encoder.", "pooler.")
_QKV = re.compile(
    r"^(?P<pre>.*encoder\.layer\.\d+\.attention\.self)\.(?P<part>query|key|value)\.(?P<kind>weight|bias)$"
)
# parameters shared with another one in the official models (weight tying): never loaded separately
_TIED_ALIASES = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "feat_regress.weight")
# buffers some exporters store that carry no learned state
_IGNORED = re.compile(r"(^|\.)(position_ids|attn_mask_cache)$|\.num_batches_tracked$")
_EXPANDABLE = ("embeddings.word_embeddings.weight", "embeddings.token_type_embeddings.weight")


class CheckpointShapeError(ValueError):
    """A checkpoint tensor whose shape the model cannot take."""


class CheckpointFormatError(ValueError):
    """A weights file that is not a readable safetensors file or torch state dict (the message names it)."""


class CheckpointMismatchError(CheckpointFormatError):
    """Weights that do not load exactly into the model: keys it lacks or does not have, or tensors of another
    shape, as weights of another task or model configuration have (the message counts each and names the first)."""


@dataclass
class LoadReport:
    """Keys the model has but the checkpoint lacked, and checkpoint keys the model does not use."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    expanded: list[str] = field(default_factory=list)
    #: checkpoint keys left out on purpose: the model's ``fresh_on_word_growth`` heads, kept as initialised
    #: when the checkpoint's vocabulary is smaller than the model's
    reinitialised: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"missing={self.missing}", f"unexpected={self.unexpected}"]
        if self.expanded:
            parts.append(f"expanded={self.expanded}")
        if self.reinitialised:
            parts.append(f"reinitialised={self.reinitialised}")
        return "LoadReport(" + ", ".join(parts) + ")"


# -- reading ---------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors from a ``.safetensors`` file or a torch file (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "model.pt"):
            if (path / name).exists():
                return read_state_dict(path / name)
        raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or model.pt in {path}")
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise CheckpointFormatError(
                f"{path}: not a readable .safetensors file, truncated or corrupt ({exc})"
            ) from None
    obj = load_torch_file(path)
    return _unwrap(obj, str(path))


def load_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> object:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never arbitrary objects.

    Raises:
        CheckpointFormatError: the file is empty, truncated, corrupt or holds other objects (the message names
            it; torch's own would advise ``weights_only=False``, which runs whatever the file holds).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise CheckpointFormatError(f"{path} is empty: not a .safetensors file or a torch state dict")
    if head == b"PK\x03\x04":
        why = zip_damage(path)
        if why is not None:
            raise CheckpointFormatError(f"{path}: torch file truncated or corrupt ({why})")
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile):
        raise CheckpointFormatError(
            f"{path} is not a .safetensors file or a torch state dict (refusing to unpickle arbitrary objects)"
        ) from None
    except (RuntimeError, OSError) as exc:
        reader = isinstance(exc, RuntimeError) and ("PytorchStreamReader" in str(exc) or "zip archive" in str(exc))
        if not (reader or (type(exc) is OSError and exc.errno == errno.EINVAL)):
            raise
        raise CheckpointFormatError(f"{path}: torch file truncated or corrupt ({str(exc).splitlines()[0]})") from None


def zip_damage(path: str | os.PathLike) -> str | None:
    """Why the zip-format torch file ``path`` is damaged (None: intact). Reads the whole file: a truncated one
    lacks its zip directory, and a changed byte anywhere fails its member's CRC-32, which ``torch.load`` does not
    check (it would load the changed values)."""
    if not zipfile.is_zipfile(path):
        return "its zip directory is missing"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        return f"its zip archive cannot be read: {exc}"
    return None if bad is None else f"member {bad} fails its CRC-32 check"


def _unwrap(obj: object, where: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return dict(obj)
        for key in ("model_state", "state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                return _unwrap(inner, where)
        if not obj:
            return {}
    raise ValueError(f"{where}: not a state dict of tensors (nor one under model_state/state_dict/model)")


# -- key normalisation -------------------------------------------------------------------------
def _rename(key: str) -> str:
    if key.startswith("module."):  # saved from DistributedDataParallel
        key = key[len("module.") :]
    if key.startswith("bert."):
        key = "uniter." + key[len("bert.") :]
    if key.endswith(".gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith(".beta"):
        key = key[: -len("beta")] + "bias"
    return key


def normalize_state_dict(sd: Mapping[str, Tensor], *, encoder_prefix: str) -> dict[str, Tensor]:
    """Official / HF / native keys -> this library's keys for a model whose encoder sits under
    ``encoder_prefix`` ("" for a bare UniterModel, "uniter." for task models).

    Renames ``bert.`` -> ``uniter.``, ``gamma``/``beta`` -> ``weight``/``bias``, drops ``module.``,
    fuses ``query``/``key``/``value`` into ``qkv`` (rows in that order), drops tied aliases.
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        key = _rename(key)
        if _IGNORED.search(key) or key in _TIED_ALIASES:
            continue
        if key.startswith("uniter."):
            key = encoder_prefix + key[len("uniter.") :]
        elif key.startswith(_ENCODER_ROOTS):
            key = encoder_prefix + key
        out[key] = value
    # fuse the attention projections
    groups: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key in list(out):
        m = _QKV.match(key)
        if m:
            groups.setdefault((m["pre"], m["kind"]), {})[m["part"]] = out.pop(key)
    for (pre, kind), parts in groups.items():
        if len(parts) == 3:
            out[f"{pre}.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
        else:  # incomplete: leave them visible as unexpected keys
            for part, t in parts.items():
                out[f"{pre}.{part}.{kind}"] = t
    return out


def official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under the official key names (separate query/key/value, tied aliases)."""
    out: dict[str, Tensor] = {}
    for key, t in model.state_dict().items():
        if key.endswith((".qkv.weight", ".qkv.bias")):
            pre, kind = key.rsplit(".qkv.", 1)
            for part, chunk in zip(("query", "key", "value"), t.chunk(3, dim=0), strict=True):
                out[f"{pre}.{part}.{kind}"] = chunk.clone()
        else:
            out[key] = t
    if hasattr(model, "cls") and hasattr(model, "uniter"):
        out["cls.predictions.decoder.weight"] = model.uniter.embeddings.word_embeddings.weight.detach()
    if hasattr(model, "feat_regress") and hasattr(model, "uniter"):
        out["feat_regress.weight"] = model.uniter.img_embeddings.img_linear.weight.detach()
    return out


# -- loading ---------------------------------------------------------------------------------------
def _first(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")


def _dims(t: Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def weights_mismatch(model: nn.Module, sd: Mapping[str, Tensor]) -> str | None:
    """What keeps ``sd`` (the model's own key names, as :func:`save_safetensors` writes them) from loading exactly
    into ``model``: the counts of missing, unexpected and differently shaped tensors, with the first few of each
    (None: it loads). A key absent because its tensor is tied to a stored one (safetensors stores a shared tensor
    once) is not missing."""
    own = model.state_dict(keep_vars=True)
    stored = {own[k].data_ptr() for k in sd if k in own}
    missing = [k for k in own if k not in sd and own[k].data_ptr() not in stored]
    unexpected = [k for k in sd if k not in own]
    shaped = [
        f"{k} ({_dims(sd[k])} in the file, {_dims(own[k])} in the model)"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    ]
    parts = [
        f"{len(keys)} {what} ({_first(keys)})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shaped))
        if keys
    ]
    return "; ".join(parts) or None


def _encoder_of(model: nn.Module) -> tuple[UniterModel, str]:
    if isinstance(model, UniterModel):
        return model, ""
    uniter = getattr(model, "uniter", None)
    if isinstance(uniter, UniterModel):
        return uniter, "uniter."
    raise TypeError(f"{type(model).__name__} is neither a UniterModel nor a model with a .uniter UniterModel")


def load_pretrained(
    model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Tensor], *, strict: bool = False
) -> LoadReport:
    """Load official UNITER/VILLA, Hugging Face BERT, or this library's weights into ``model``.

    Tensors are copied into the existing parameters (their dtype/device kept), so hooks and
    optimizers built on the model stay valid. Word and type embeddings smaller than the model's
    (a pre-trained checkpoint into an NLVR2/VCR model) fill the first rows; the task model's
    ``expand_rules`` fill the added rows. When the word embeddings grow, the keys under the model's
    ``fresh_on_word_growth`` prefixes are not loaded (VCR pre-training's new MLM head; listed in
    ``reinitialised``). A retrieval model whose checkpoint has ``itm_output`` but no ``rank_output`` gets
    rank_output from itm_output's "match" row; one that has both keeps its trained ``rank_output`` (the
    authors' ``train_itm.py`` resets it from the match row after every load, a fine-tuned one included).

    Raises:
        CheckpointShapeError: a tensor's shape does not fit (the message names the key and both shapes).
        RuntimeError: ``strict`` and keys are missing or unexpected.
    """
    if isinstance(path_or_state_dict, Mapping):
        raw = _unwrap(path_or_state_dict, "the given state dict")
    else:
        raw = read_state_dict(path_or_state_dict)
    uniter, prefix = _encoder_of(model)
    sd = normalize_state_dict(raw, encoder_prefix=prefix)
    own = model.state_dict(keep_vars=True)
    rules = getattr(model, "expand_rules", {})
    report = LoadReport()
    words = prefix + "embeddings.word_embeddings.weight"
    grows = words in sd and words in own and sd[words].shape[0] < own[words].shape[0]
    fresh = tuple(getattr(model, "fresh_on_word_growth", ())) if grows else ()
    with torch.no_grad():
        for key, src in sd.items():
            if fresh and key.startswith(fresh):
                report.reinitialised.append(key)
                continue
            dst = own.get(key)
            if dst is None:
                report.unexpected.append(key)
                continue
            if src.shape == dst.shape:
                dst.copy_(src)
                continue
            local = key[len(prefix) :] if key.startswith(prefix) else key
            if local in _EXPANDABLE and src.dim() == 2 and src.shape[1] == dst.shape[1] and src.shape[0] < dst.shape[0]:
                dst[: src.shape[0]].copy_(src)
                name = local.split(".")[1]
                for new_row, src_row in rules.get(name, {}).items():
                    if new_row >= src.shape[0] and src_row < src.shape[0]:
                        dst[new_row].copy_(src[src_row])
                report.expanded.append(key)
                continue
            raise CheckpointShapeError(
                f"checkpoint tensor {key!r} has shape {tuple(src.shape)} but the model's has shape {tuple(dst.shape)}"
            )
        report.missing = [k for k in own if k not in sd and not (fresh and k.startswith(fresh))]
        if (
            "rank_output.weight" in report.missing
            and "itm_output.weight" in sd
            and hasattr(model, "init_rank_from_itm")
        ):
            model.init_rank_from_itm()
            report.missing = [k for k in report.missing if not k.startswith("rank_output.")]
    if strict and (report.missing or report.unexpected):
        raise RuntimeError(f"strict load into {type(model).__name__} failed: {report}")
    return report


def init_from_hf_bert(model: nn.Module, path_or_dir: str | os.PathLike | Mapping[str, Tensor]) -> LoadReport:
    """Initialise the text side (embeddings, encoder, pooler) from a Hugging Face BERT checkpoint.

    ``path_or_dir``: a ``model.safetensors`` / ``pytorch_model.bin`` file, a directory holding one,
    or a state dict. BertModel keys (``embeddings.*``) and BertFor* keys (``bert.*``) are both
    accepted; the pre-training heads (``cls.*``) are used only by a model that has them. Image
    embeddings and task heads stay as initialised (reported missing).
    """
    if isinstance(path_or_dir, Mapping):
        raw = _unwrap(path_or_dir, "the given state dict")
    else:
        raw = read_state_dict(path_or_dir)
    _, prefix = _encoder_of(model)
    keep_cls = hasattr(model, "cls")
    sd = {}
    for key, t in raw.items():
        k = key[len("bert.") :] if key.startswith("bert.") else key
        if k.startswith(_ENCODER_ROOTS):
            sd["uniter." + k] = t
        elif keep_cls and k.startswith("cls.predictions."):
            sd[k] = t
    return load_pretrained(model, sd)


# -- saving ----------------------------------------------------------------------------------------
def save_safetensors(model: nn.Module, path: str | os.PathLike, *, official_names: bool = False) -> None:
    """Write the weights to ``path`` (safetensors), the encoder config in the metadata.

    ``official_names=True`` writes the official key names (separate query/key/value) instead; tied
    aliases are left out either way (safetensors stores no shared tensors).
    """
    from safetensors.torch import save_file

    if official_names:
        sd = {k: v for k, v in official_state_dict(model).items() if k not in _TIED_ALIASES}
    else:
        sd = model.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    uniter, _ = _encoder_of(model)
    # the config the model is built from: a VCR model's grows its vocabulary and types when built, so its
    # encoder's own config would grow them a second time when rebuilt from the file
    source = getattr(model, "source_config", None) or uniter.config
    meta = {"format": "pt", "uniter_config": json.dumps(source.to_dict()), "model": type(model).__name__}
    save_file(tensors, str(path), metadata=meta)
