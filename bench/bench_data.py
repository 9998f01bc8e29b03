"""Loader throughput on the demo data: examples per second with 0, 2 and 4 workers.

Run from the repository root: ``python -m bench.bench_data [--root DIR] [--epochs N]``.
Also reports how many distinct batch shapes one epoch yields with and without fixed-shape
padding.  Prints a markdown table and writes ``bench/out/bench_data.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from villa_fast.data import (
    DetectFeatLmdb,
    PadBuckets,
    TxtTokLmdb,
    VqaDataset,
    build_dataloader,
    count_shapes,
    vqa_collate,
)
from villa_fast.data.demo import build_demo_data, demo_data_version


def _epoch(ds, workers: int, tokens: int, epoch: int, device) -> tuple[float, int]:
    ld = build_dataloader(
        ds,
        vqa_collate,
        batch_size_tokens=tokens,
        is_train=True,
        seed=0,
        epoch=epoch,
        num_workers=workers,
        device=device,
    )
    t = time.perf_counter()
    n = 0
    for b in ld:
        n += b["input_ids"].size(0)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", default=None, help="demo data directory (built if missing)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per setting (median reported)")
    p.add_argument("--tokens", type=int, default=4096, help="token budget per batch")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--device", default=None, help="e.g. cuda to include the side-stream copy")
    args = p.parse_args(argv)
    # the default cache folder is named after the demo data's version, so a newer generator never meets old data
    default = Path(tempfile.gettempdir()) / f"villa_fast_demo_bench_v{demo_data_version()}"
    root = Path(args.root) if args.root else default
    paths = build_demo_data(root)
    img = DetectFeatLmdb(paths["img_db"], **paths["img_db_args"])
    ds = VqaDataset(paths["num_answers"], TxtTokLmdb(paths["train_txt_db"], -1), img)

    rows = []
    for w in args.workers:
        _epoch(ds, w, args.tokens, 99, args.device)  # warm-up (page cache, worker start)
        times, n = zip(*(_epoch(ds, w, args.tokens, e, args.device) for e in range(args.epochs)), strict=True)
        med = statistics.median(times)
        rows.append({"workers": w, "examples": n[0], "median_s": med, "examples_per_s": n[0] / med})

    plain = list(build_dataloader(ds, vqa_collate, batch_size_tokens=args.tokens, is_train=True, seed=0))
    pb = PadBuckets(txt=(12, 16, 24), img=(4, 6, 8, 10))
    fixed = list(
        build_dataloader(ds, vqa_collate, batch_size_tokens=args.tokens, is_train=True, seed=0, pad_buckets=pb)
    )

    env = {
        "date": datetime.date.today().isoformat(),
        "device": args.device
        or f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print(f"# loader throughput, demo VQA train ({len(ds)} examples), {args.tokens} tokens/batch")
    print(f"{env['device']}, torch {env['torch']}, {env['date']}\n")
    print("| workers | examples/epoch | median s/epoch | examples/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['examples']} | {r['median_s']:.3f} | {r['examples_per_s']:.0f} |")
    print(
        f"\ndistinct batch shapes per epoch: {count_shapes(plain)} ({len(plain)} batches) without padding, "
        f"{count_shapes(fixed)} ({len(fixed)} batches) with {pb}"
    )
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    with open(out / "bench_data.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=[*env, *rows[0]])
        wr.writeheader()
        for r in rows:
            wr.writerow({**env, **r})


if __name__ == "__main__":
    main()
