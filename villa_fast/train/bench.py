"""``villa-fast bench``: time a standard and a VILLA optimizer step of the demo-sized UNITER here.

Synthetic batches of the demo's shapes (64 questions of 12 tokens, 8 regions of 128-d
features); median of repeated ``time.perf_counter`` measurements, examples per second and the
VILLA / standard ratio (VILLA_SPEC section 2: 4x the FLOPs for K = 3 with the single clean backward).
"""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["run_bench"]


def _batch(b: int, lt: int, nbb: int, vocab: int, img_dim: int, num_answers: int, device) -> dict:
    from villa_fast.data import base_batch

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(5, vocab, (lt,), generator=g) for _ in range(b)]
    feats = [torch.randn(nbb, img_dim, generator=g) for _ in range(b)]
    pos = [torch.rand(nbb, 7, generator=g) for _ in range(b)]
    batch = base_batch(ids, feats, pos)
    batch["targets"] = torch.zeros(b, num_answers).scatter_(1, torch.randint(0, num_answers, (b, 1), generator=g), 1.0)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def run_bench(steps: int = 20, device: str = "auto", batch_size: int = 64) -> dict[str, float]:
    from villa_fast.data.demo import ANSWERS, demo_model_config
    from villa_fast.models import UniterForVqa
    from villa_fast.train.report import format_table

    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    mc = demo_model_config()
    num_answers = len(ANSWERS)
    model = UniterForVqa(mc, num_answer=num_answers).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = _batch(batch_size, 12, 8, mc["vocab_size"], mc["img_dim"], num_answers, dev)

    def standard():
        loss = model(batch, compute_loss=True)
        loss.backward()

    variants = {"standard": standard}
    try:
        from villa_fast.adversarial import AdversarialConfig, VillaStep

        for k in (1, 3):
            step = VillaStep(
                lambda b: model(b),
                lambda z, b: model.loss(z, b),
                AdversarialConfig(steps=k, modality="text+image", lr_txt=1e-3, lr_img=1e-3),
                text_embedding=model.uniter.embeddings.word_embeddings,
                image_input=model.uniter.img_embeddings.img_linear,
            )
            variants[f"VILLA K={k}"] = lambda s=step: s.step(
                batch, txt_mask=batch["txt_mask"], img_mask=batch["img_mask"]
            )
    except ImportError:
        pass

    times: dict[str, float] = {}
    for name, fn in variants.items():
        ts = []
        for i in range(steps + 3):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                ts.append(time.perf_counter() - t0)
        times[name] = statistics.median(ts)
    base = times["standard"]
    rows = [[n, f"{1000 * t:.1f}", f"{batch_size / t:.0f}", f"{t / base:.2f}x"] for n, t in times.items()]
    print(f"device {dev}, {torch.get_num_threads()} threads, batch {batch_size} x (12 tokens + 8 regions)")
    print(format_table(["step", "ms (median)", "examples/s", "vs standard"], rows))
    return times
