"""``villa-fast demo``: standard vs VILLA fine-tuning of a small UNITER on the embedded demo task.

Builds the demo data (synthetic scenes and template questions, :mod:`villa_fast.data.demo`) if
missing, trains the same model twice from the same initialisation and data order (standard,
then VILLA; each a new run: an earlier demo's checkpoints, logs and predictions in its run
directory are replaced), evaluates clean accuracy and accuracy under a K-step embedding-space attack, writes
the training curves as a PNG and prints a table.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

__all__ = ["DEMO_CONFIG", "demo_config", "run_demo"]

#: the demo's training configuration (official keys; data paths are filled in by demo_config)
DEMO_CONFIG: dict[str, Any] = {
    "task": "vqa",
    "max_txt_len": 60,
    "conf_th": 0.2,
    "max_bb": 10,
    "min_bb": 4,
    "num_bb": 10,
    "compressed_db": True,
    "train_batch_size": 1280,
    "val_batch_size": 8192,
    "gradient_accumulation_steps": 1,
    "learning_rate": 2e-3,
    "lr_mul": 1.0,
    "valid_steps": 500,
    "num_train_steps": 1500,
    "warmup_steps": 150,
    "optim": "adamw",
    "betas": [0.9, 0.98],
    "dropout": 0.0,
    "weight_decay": 0.01,
    "grad_norm": 2.0,
    "seed": 42,
    "fp16": False,
    "n_workers": 1,
    "adv_training": False,
    "adv_modality": ["text"],
    "adv_lr_txt": 0.1,
    "adv_lr_img": 1e-3,
    "adv_steps": 2,
    "norm_type": "l2",
    "adv_max_norm": 0.2,
    "adv_init_mag": 0.0,
    "adv_kl_weight": 1.5,
    "device": "cpu",
    "log_steps": 10,
    "keep_checkpoints": 1,
    "attack_steps": 3,
    "attack_eps": 0.2,
    "attack_modality": ["text"],
}


def demo_config(data: dict[str, Any], output_dir: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    """:data:`DEMO_CONFIG` pointed at the paths ``build_demo_data`` returned."""
    cfg = dict(DEMO_CONFIG)
    cfg.update(
        train_txt_db=data["train_txt_db"],
        train_img_db=data["img_db"],
        val_txt_db=data["val_txt_db"],
        val_img_db=data["img_db"],
        model_config=data["model_config"],
        ans2label=data["ans2label"],
        output_dir=os.fspath(output_dir),
    )
    cfg.update(changes)
    return cfg


def _clear_run(run_dir: Path) -> None:
    """Remove what an earlier demo run wrote in ``run_dir`` (the trainer's ckpt, log and results)."""
    for sub in ("ckpt", "log", "results"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)


def _train_and_eval(cfg: dict[str, Any], quiet: bool) -> tuple[list[dict], dict, float]:
    from villa_fast.train.config import resolve_config
    from villa_fast.train.trainer import Trainer

    resolved = resolve_config(None, cfg)
    t0 = time.perf_counter()
    trainer = Trainer(resolved, quiet=quiet)
    history = trainer.train()
    train_s = time.perf_counter() - t0
    metrics = trainer.evaluate("val", robust=True)
    trainer.close()
    return history, metrics, train_s


def run_demo(
    output_dir: str | os.PathLike = "villa_demo",
    data_dir: str | os.PathLike | None = None,
    *,
    steps: int | None = None,
    seed: int = 42,
    quiet: bool = False,
    out: TextIO = sys.stdout,
    **changes: Any,
) -> dict[str, Any]:
    """Run the demo; returns {"standard": metrics, "villa": metrics, "plot": path, "seconds": total}."""
    from villa_fast.data.demo import build_demo_data
    from villa_fast.train.report import format_table, plot_curves

    t_start = time.perf_counter()
    output_dir = Path(output_dir)
    data_dir = Path(data_dir) if data_dir is not None else output_dir / "data"

    def say(msg: str) -> None:
        print(msg, file=out, flush=True)

    # one compute thread and one data-loading process: a steady use of two cores (several compute
    # threads on small matrices lose more to synchronisation than they gain, above all on a busy machine)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    say("villa_fast demo: standard vs VILLA fine-tuning of a small UNITER on the CPU")
    t0 = time.perf_counter()
    done = data_dir / "DONE"
    fresh = not done.is_file()
    before = done.read_text(encoding="utf-8") if not fresh else None
    # demo data of an earlier version of the builder is rebuilt (the demo owns it, as it owns its runs)
    data = build_demo_data(data_dir, rebuild_stale=True)
    fresh = fresh or done.read_text(encoding="utf-8") != before
    mc = json.load(open(data["model_config"], encoding="utf-8"))
    n_train = sum(1 for _ in json.load(open(Path(data["train_txt_db"]) / "id2len.json", encoding="utf-8")))
    n_val = sum(1 for _ in json.load(open(Path(data["val_txt_db"]) / "id2len.json", encoding="utf-8")))
    say(
        f"[1/3] demo data {'built' if fresh else 'found'} in {time.perf_counter() - t0:.1f} s: {data_dir} "
        f"({n_train} train / {n_val} val questions, {data['num_answers']} answers)"
    )
    say(
        f"      model: UNITER {mc['num_hidden_layers']} layers, hidden {mc['hidden_size']}, "
        f"{mc['img_dim']}-d region features"
    )
    changes = dict(changes)
    changes["seed"] = seed
    if steps is not None:
        changes["num_train_steps"] = steps
        changes["warmup_steps"] = max(1, steps // 10)
        changes["valid_steps"] = max(1, steps // 5)
    runs: dict[str, list[dict]] = {}
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for k, (name, adv) in enumerate((("standard", False), ("VILLA", True)), start=2):
        run_dir = output_dir / name.lower()
        _clear_run(run_dir)
        cfg = demo_config(data, run_dir, adv_training=adv, **changes)
        what = (
            f"VILLA fine-tuning (K={cfg['adv_steps']} adversarial steps on the word embeddings)"
            if adv
            else "standard fine-tuning"
        )
        say(f"[{k}/3] {what}: {cfg['num_train_steps']} steps ...")
        history, metrics, secs = _train_and_eval(cfg, quiet)
        runs[name] = history
        results[name] = metrics
        seconds[name] = secs
        say(
            f"      done in {secs:.0f} s: clean accuracy {100 * metrics['acc']:.2f}%, "
            f"robust accuracy {100 * metrics['robust_acc']:.2f}%"
        )
    plot = plot_curves(runs, output_dir / "training_curves.png", title="demo: standard vs VILLA fine-tuning")
    a = DEMO_CONFIG | changes
    say("")
    say(
        f"Validation accuracy ({int(results['standard']['n'])} questions); robust = under a "
        f"{a['attack_steps']}-step l2 attack of radius {a['attack_eps']:g} on the word embeddings "
        f"(`evaluate --robust`):"
    )
    rows = [[name, results[name]["acc"], results[name]["robust_acc"], f"{seconds[name]:.0f} s"] for name in results]
    say(format_table(["run", "clean acc %", "robust acc %", "train time"], rows))
    total = time.perf_counter() - t_start
    say("")
    if plot:
        say(f"training curves: {plot}")
    say(f"total time: {total:.0f} s")
    torch.set_num_threads(prev_threads)
    return {"standard": results["standard"], "villa": results["VILLA"], "plot": plot, "seconds": total}
