"""``villa-fast`` / ``python -m villa_fast``: train, pretrain, evaluate, convert, bench, demo.

Configs are the authors' JSON files (official keys, see :mod:`villa_fast.train.config`); any key
can be overridden with ``--<key> value`` on the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _config_parser(name: str, sub, help: str) -> argparse.ArgumentParser:
    from villa_fast.train.config import add_override_flags

    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--config", help="JSON config (the authors' files run unchanged)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    add_override_flags(p)
    return p


def _build_parser() -> argparse.ArgumentParser:
    from villa_fast import __version__

    parser = argparse.ArgumentParser(prog="villa-fast", description="VILLA adversarial training of UNITER.")
    parser.add_argument("--version", action="version", version=f"villa_fast {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _config_parser("train", sub, "fine-tune on a task (standard or VILLA adversarial)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir/ckpt")

    p = _config_parser("pretrain", sub, "(adversarial) pre-training: MLM, MRFR, MRC, MRC-kl, ITM")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir/ckpt")

    p = _config_parser("evaluate", sub, "evaluate a trained model (clean, and with --robust under attack)")
    p.add_argument("--weights", help="a checkpoint directory (ckpt/step_N), .safetensors or official .pt file")
    p.add_argument("--split", default="val", choices=["val", "test"], help="which split")
    p.add_argument("--robust", action="store_true", help="also report accuracy under a K-step embedding attack")
    p.add_argument(
        "--predictions",
        help="path prefix: write the clean predictions as the authors' inference scripts do, and the metrics as JSON",
    )

    sub.add_parser("convert", help="build txt_db / img_db from raw data (see `convert --help`)", add_help=False)

    p = sub.add_parser("bench", help="time standard vs VILLA training steps of the demo model on this machine")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("demo", help="standard vs VILLA fine-tuning on the embedded demo data (a few minutes on CPU)")
    p.add_argument("--output-dir", default="villa_demo", help="where data, checkpoints, logs and the plot go")
    p.add_argument("--data-dir", help="demo data directory (default: OUTPUT_DIR/data)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default from the demo config)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _resolve(args, force_task: str | None = None) -> dict:
    from villa_fast.train.config import overrides_from_args, resolve_config

    overrides = overrides_from_args(args)
    if force_task is not None:
        overrides.setdefault("task", force_task)
    return resolve_config(args.config, overrides)


def _print_metrics(title: str, metrics: dict) -> None:
    from villa_fast.train.report import format_table

    rows = [[k, v] for k, v in metrics.items() if k != "n"]
    print(title)
    print(format_table(["metric", "value"], rows))


def _cmd_train(args, force_task: str | None = None) -> int:
    from villa_fast.train.config import to_json

    cfg = _resolve(args, force_task)
    if args.print_config:
        sys.stdout.write(to_json(cfg))
        return 0
    if cfg["task"] is None:
        raise SystemExit("error: the task is not known: pass --task (or use an official config file name)")
    if not cfg.get("output_dir"):
        raise SystemExit("error: config key 'output_dir' is required for training")
    from villa_fast.train.trainer import Trainer

    trainer = Trainer(cfg, resume=args.resume)
    history = trainer.train()
    if trainer.dist.is_main:
        from villa_fast.train.report import plot_curves

        out = trainer.output_dir
        plot_curves({cfg["task"]: history}, out / "log" / "training_curves.png", title=f"{cfg['task']} training")
        val = [e for e in history if any(k.startswith("val/") for k in e)]
        if val:
            last = {k[4:]: v for k, v in val[-1].items() if k.startswith("val/")}
            _print_metrics(f"{cfg['task']} after {trainer.global_step} steps (validation):", last)
        print(f"checkpoints: {out / 'ckpt'}; logs and plot: {out / 'log'}")
    trainer.close()
    return 0


def _cmd_evaluate(args) -> int:
    from pathlib import Path

    from villa_fast.train.config import to_json

    cfg = _resolve(args)
    if args.print_config:
        sys.stdout.write(to_json(cfg))
        return 0
    cfg["checkpoint"] = None
    from villa_fast.train.trainer import Trainer

    trainer = Trainer(cfg)
    if args.weights:
        w = Path(args.weights)
        if w.is_dir():
            from villa_fast.train.checkpoint import load_checkpoint

            load_checkpoint(w, trainer.model, map_location=trainer.device)
        else:
            from villa_fast.models import load_pretrained

            report = load_pretrained(trainer.model, w)
            if report.missing:
                raise SystemExit(f"error: {w} lacks weights the model needs: {report.missing[:5]} ...")
    metrics = trainer.evaluate(args.split, robust=args.robust, predictions_prefix=args.predictions)
    if trainer.dist.is_main:
        title = f"{cfg['task']} on {args.split}"
        if args.robust:
            title += (
                f" (robust: {cfg['attack_steps']}-step {cfg['norm_type']} attack, radius {cfg['attack_eps']:g}, "
                f"on {'+'.join(cfg['attack_modality'])})"
            )
        _print_metrics(title + ":", metrics)
        if args.predictions:
            json.dump(metrics, open(args.predictions + ".metrics.json", "w", encoding="utf-8"), indent=2)
    trainer.close()
    return 0


def _cmd_bench(args) -> int:
    from villa_fast.train.bench import run_bench

    run_bench(steps=args.steps, device=args.device)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        from villa_fast.data.convert import main as convert_main

        return convert_main(argv[1:], prog="villa-fast convert")
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    from villa_fast.train.config import ConfigError

    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "pretrain":
            return _cmd_train(args, force_task="pretrain")
        if args.command == "evaluate":
            return _cmd_evaluate(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "demo":
            from villa_fast.train.demo import run_demo

            run_demo(args.output_dir, args.data_dir, steps=args.steps, seed=args.seed, quiet=args.quiet)
            return 0
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
