"""How much of a VILLA perturbation reaches the encoder under low-precision autocast.

The adversarial step keeps its perturbations in float32 and adds them where they enter the model (the
output of the word embedding; the region features, or for an ``nn.Linear`` image layer its output, as
``W delta``); with ``fp32_embeddings`` (the default) the whole
embedding block runs in float32, so nothing is lost there (``StepResult.perturbation_survival`` measures
that injection point). The first matrix multiplies of the encoder then cast their input to the autocast
dtype, and a change much smaller than half a unit in the last place of the clean activation is rounded
away. This measures, for ``UniterForVqa``, the fraction of encoder-input elements of each modality that
a perturbation still changes after that cast (float32, float16, bfloat16), for perturbations of the
sizes one adversarial step makes (per-example L2 norm ``adv_lr``; K steps reach at most K times that),
injected by the adversarial step's own hooks. Model in eval mode (no dropout), weights from
``--checkpoint`` (a UNITER checkpoint, loaded without executing anything) or a random initialisation;
the batch is bench_step's synthetic one (region features uniform in [0, 2)).

    python -m bench.perturbation_survival [--lrs 1e-3,1e-2,1e-1] [--batch 8] [--tiny] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bench import bench_step as bs
from bench._common import markdown, meta, write_csv
from villa_fast.adversarial.hooks import Injector

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: name -> (the encoder's input cast, whether the embedding block's matrix products read TF32 inputs)
PRECISIONS = {
    **{name: (dt, False) for name, dt in DTYPES.items()},
    "tf32": (torch.float32, True),
    "tf32+float16": (torch.float16, True),
    "tf32+bfloat16": (torch.bfloat16, True),
}


def to_tf32(x: Tensor) -> Tensor:
    """float32 values rounded to TF32 (10 mantissa bits, to nearest, ties away from zero): what a tensor core
    multiplies when TF32 matrix products are allowed. Emulated on the bit pattern, so it runs on any device."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@contextlib.contextmanager
def tf32_products():
    """Every ``torch.nn.functional.linear`` (so every ``nn.Linear``) multiplies TF32-rounded inputs and weights,
    accumulating in float32: what allowing TF32 matrix products does on a GPU, emulated."""
    linear = F.linear

    def tf32_linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        if x.dtype != torch.float32 or w.dtype != torch.float32:
            return linear(x, w, b)
        return linear(to_tf32(x), to_tf32(w), b)

    F.linear = tf32_linear
    try:
        yield
    finally:
        F.linear = linear


def encoder_input(model, batch: dict, injector: Injector, deltas: dict[str, Tensor | None]) -> Tensor:
    """The encoder's input [B, L, H] (float32) with ``deltas`` added at the adversarial step's injection points."""
    injector.deltas.update(deltas)
    try:
        with torch.no_grad():
            u = model.uniter
            return u.joint_embeddings(
                batch["input_ids"],
                batch["position_ids"],
                batch["img_feat"],
                batch["img_pos_feat"],
                batch.get("gather_index"),
            ).float()
    finally:
        injector.deltas["text"] = injector.deltas["image"] = None


def survival_rows(model, batch: dict, lrs: list[float], seed: int = 0, split: bool = True) -> list[dict]:
    """One row per (modality, lr), for a random perturbation of per-example L2 norm ``lr``, and for each of
    PRECISIONS: the fraction of that modality's encoder-input elements the perturbation still changes after the
    cast (key: the precision's name), and the cosine between that change and the float32 one (``cos <name>``: 1
    when the cast keeps the change's direction, near 0 when rounding leaves only noise). ``split=False`` adds
    the image delta to the projection's input instead of adding ``W delta`` to its output (see
    villa_fast.adversarial.hooks): the features and the delta are then rounded together."""
    u = model.uniter
    injector = Injector(u.embeddings.word_embeddings, u.img_embeddings.img_linear)
    injector.image_split = split
    g = torch.Generator().manual_seed(seed)
    n_txt = batch["input_ids"].shape[1]

    def both(deltas: dict) -> dict[bool, Tensor]:
        out = {False: encoder_input(model, batch, injector, deltas)}
        with tf32_products():
            out[True] = encoder_input(model, batch, injector, deltas)
        return out

    try:
        x0 = both({})
        shapes = {
            "text": (*batch["input_ids"].shape, u.config.hidden_size),
            "image": tuple(batch["img_feat"].shape),
        }
        rows = []
        for modality, shape in shapes.items():
            span = slice(0, n_txt) if modality == "text" else slice(n_txt, None)
            for lr in lrs:
                d = torch.randn(shape, generator=g)
                d = d * (lr / d.flatten(1).norm(dim=1)).view(-1, *([1] * (d.dim() - 1)))
                x1 = both({modality: d.to(x0[False].device)})
                ref = (x1[False] - x0[False])[:, span].flatten().double()
                row = {
                    "modality": modality,
                    "adv_lr": f"{lr:g}",
                    "per-element": f"{lr / math.sqrt(math.prod(shape[1:])):.1e}",
                }
                for name, (dt, tf32) in PRECISIONS.items():
                    a, b = x0[tf32][:, span].to(dt), x1[tf32][:, span].to(dt)
                    row[name] = (a != b).float().mean().item()
                    change = (b.double() - a.double()).flatten()
                    denom = change.norm() * ref.norm()
                    row[f"cos {name}"] = float(change @ ref / denom) if denom > 0 else 0.0
                rows.append(row)
        return rows
    finally:
        injector.remove()


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lrs", default="1e-3,1e-2,1e-1", help="per-example L2 norms of the perturbation")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="a 2 x 64 model")
    ap.add_argument("--checkpoint", default=None, help="UNITER weights (.pt / .safetensors) to load first")
    ap.add_argument(
        "--input-add",
        action="store_true",
        help="add the image delta to the projection's input (the released code's way) instead of W delta to its output",
    )
    a = ap.parse_args(argv)
    device = torch.device("cpu")
    c = bs.model_cfg("tiny" if a.tiny else "gpu")
    torch.manual_seed(0)
    setup = bs.build_setup("uniter", c, device)
    model = setup.model.eval()
    if a.checkpoint:
        from villa_fast.models.checkpoint import load_pretrained

        load_pretrained(model, a.checkpoint)
    lrs = [float(x) for x in a.lrs.split(",") if x]
    rows = survival_rows(model, bs.make_batch(c, a.batch, device), lrs, split=not a.input_add)
    info = meta(device)
    path = write_csv("perturbation_survival.csv", rows, info)
    weights = a.checkpoint or "random initialisation"
    where = "projection input" if a.input_add else "W delta added to the projection output"
    print(f"\nperturbation survival at the encoder input, UniterForVqa ({c.layers} x {c.hidden}), {weights}")
    print(f"(image delta: {where})")
    print("(fraction of each modality's encoder-input elements that still differ after the cast;")
    print(" tf32: the embedding block's matrix products read TF32-rounded inputs, emulated)\n")
    print(markdown(rows, ["modality", "adv_lr", "per-element", *PRECISIONS]))
    print("\ndirection kept: cosine between the change after the cast and the float32 change\n")
    print(markdown(rows, ["modality", "adv_lr", *(f"cos {n}" for n in PRECISIONS)]))
    print(f"\nCSV: {path}")
    return rows


if __name__ == "__main__":
    main()
