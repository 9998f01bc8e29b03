"""``villa-fast`` / ``python -m villa_fast``: train, pretrain, evaluate, convert, bench, demo.

Configs are the authors' JSON files (official keys, see :mod:`villa_fast.train.config`); any key
can be overridden with ``--<key> value`` on the command line.

A user mistake (a bad config value, a missing or unreadable file, malformed data) or a file system error
about a named file (a read-only or full disk) ends with one line, ``error: ...`` (``config error: ...`` for a
config key), and exit status 2; ``--debug`` shows the traceback instead. Other errors (bugs) keep their
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "run_reporting_errors"]

#: what a user's input raises: bad values and formats (ConfigError, DataFormatError, CheckpointFormatError and
#: the other ValueErrors) and files that are missing, in the way or unreadable
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def _is_user_error(exc: BaseException) -> bool:
    """One of :data:`USER_ERRORS`, or an ``OSError`` the system raised about a named file (``errno`` and
    ``filename`` set: a read-only file system, a full disk): the file and the reason say what to do."""
    if isinstance(exc, USER_ERRORS):
        return True
    return isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror and str(exc).startswith("["):
        # "[Errno 2] No such file or directory: 'x'" -> "x: No such file or directory"
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def run_reporting_errors(fn: Callable[[], int], debug: bool = False) -> int:
    """``fn()``; a user error (:data:`USER_ERRORS`, or an ``OSError`` with an errno and a file name) prints
    ``error: <message>`` to stderr (``error: <file>: <reason>`` for a file system error) and returns 2
    (``debug``: re-raised, with its traceback). Anything else propagates with its traceback."""
    try:
        return fn()
    except Exception as exc:
        if debug or not _is_user_error(exc):
            raise
        from villa_fast.train.config import ConfigError

        prefix = "config error" if isinstance(exc, ConfigError) else "error"
        print(f"{prefix}: {_message(exc)}", file=sys.stderr)
        return 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def check_device(spec: str, what: str) -> None:
    """A clear error for a device this torch cannot use (``what`` names where it was given)."""
    import torch

    if spec == "auto":
        return
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what} {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise ValueError(
            f"{what} {spec!r}: this torch build ({torch.__version__}) has no CUDA support; use cpu (or auto), "
            "or install a CUDA build of torch"
        )
    if not torch.cuda.is_available():
        raise ValueError(f"{what} {spec!r}: no CUDA device is visible (torch.cuda.is_available() is False); use cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{what} {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")


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
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of input errors (normally one line: error: ...)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = _config_parser("train", sub, "fine-tune on a task (standard or VILLA adversarial)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir/ckpt")

    p = _config_parser("pretrain", sub, "(adversarial) pre-training: MLM, MRFR, MRC, MRC-kl, ITM")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir/ckpt")

    p = _config_parser("evaluate", sub, "evaluate a trained model (clean, and with --robust under attack)")
    p.add_argument(
        "--weights",
        help="the trained weights: a checkpoint directory (ckpt/step_N), .safetensors or official .pt file "
        "(default: the config's 'checkpoint'; one of the two is required)",
    )
    p.add_argument("--split", default="val", choices=["val", "test"], help="which split")
    p.add_argument("--robust", action="store_true", help="also report accuracy under a K-step embedding attack")
    p.add_argument(
        "--predictions",
        help="path prefix: write the clean predictions as the authors' inference scripts do, and the metrics as JSON",
    )

    sub.add_parser("convert", help="build txt_db / img_db from raw data (see `convert --help`)", add_help=False)

    p = sub.add_parser("bench", help="time standard vs VILLA training steps of the demo model on this machine")
    p.add_argument("--steps", type=_positive_int, default=20, help="timed optimizer steps per variant")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    p = sub.add_parser("demo", help="standard vs VILLA fine-tuning on the embedded demo data (a few minutes on CPU)")
    p.add_argument("--output-dir", default="villa_demo", help="where data, checkpoints, logs and the plot go")
    p.add_argument("--data-dir", help="demo data directory (default: OUTPUT_DIR/data)")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps per run (default from the demo config)")
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
    from villa_fast.train.config import ConfigError, to_json

    cfg = _resolve(args, force_task)
    if args.print_config:
        sys.stdout.write(to_json(cfg))
        return 0
    if cfg["task"] is None:
        raise ConfigError("the task is not known: pass --task (or use an official config file name)")
    if not cfg.get("output_dir"):
        raise ConfigError("key 'output_dir' is required for training")
    check_device(cfg["device"], "key 'device'")
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


def _evaluation_weights(args, cfg: dict):
    """The weights evaluate loads: ``--weights``, else the config's ``checkpoint`` (checked to exist)."""
    from pathlib import Path

    if args.weights:
        w, source = Path(args.weights), "--weights"
    elif cfg.get("checkpoint"):
        w, source = Path(cfg["checkpoint"]), "key 'checkpoint'"
    else:
        raise ValueError(
            "nothing to evaluate: give --weights (a checkpoint directory ckpt/step_N, a .safetensors or an official "
            ".pt file) or set 'checkpoint' to the trained weights; evaluate does not run randomly initialised weights"
        )
    if not w.exists():
        raise FileNotFoundError(f"{source} {w}: no such file or directory")
    return w, source


def _load_evaluation_weights(trainer, w, source: str) -> None:
    """Load all of the model's weights from ``w``: a training checkpoint directory exactly, a weights file or
    directory through :func:`villa_fast.models.load_pretrained`, which must leave no weight of the model
    missing (a pre-trained checkpoint has no task head: evaluating one would score a random head)."""
    if w.is_dir() and (w / "train_state.pt").is_file():
        from villa_fast.train.checkpoint import load_checkpoint

        load_checkpoint(w, trainer.model, map_location=trainer.device)
        return
    from villa_fast.models import load_pretrained

    report = load_pretrained(trainer.model, w)
    if report.missing:
        few = ", ".join(report.missing[:5]) + (" ..." if len(report.missing) > 5 else "")
        raise ValueError(
            f"{source} {w} lacks {len(report.missing)} weights the {trainer.task.name} model needs ({few}): "
            "these would be evaluated at their random initialisation. Give the fine-tuned weights (a pre-trained "
            "checkpoint has no task head), e.g. --weights OUTPUT_DIR/ckpt/step_N"
        )


def _cmd_evaluate(args) -> int:
    from villa_fast.train.config import ConfigError, to_json

    cfg = _resolve(args)
    if args.print_config:
        sys.stdout.write(to_json(cfg))
        return 0
    if cfg["task"] is None:
        raise ConfigError("the task is not known: pass --task (or use an official config file name)")
    w, source = _evaluation_weights(args, cfg)
    if cfg["task"] == "vqa" and not cfg.get("ans2label") and w:
        # weights of a training run: the answer vocabulary the run kept beside its checkpoints
        from pathlib import Path

        here = Path(w) if Path(w).is_dir() else Path(w).parent
        for d in (here, here.parent):
            if (d / "ans2label.json").is_file():
                cfg["ans2label"] = str(d / "ans2label.json")
                break
    check_device(cfg["device"], "key 'device'")
    # the weights are loaded below, all of them and checked; the Trainer does not load 'checkpoint' as an init
    cfg["checkpoint"] = None
    from villa_fast.train.trainer import Trainer

    trainer = Trainer(cfg)
    _load_evaluation_weights(trainer, w, source)
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
            with open(args.predictions + ".metrics.json", "w", encoding="utf-8") as fh:
                json.dump(metrics, fh, indent=2)
    trainer.close()
    return 0


def _cmd_bench(args) -> int:
    check_device(args.device, "--device")
    from villa_fast.train.bench import run_bench

    run_bench(steps=args.steps, device=args.device)
    return 0


_GLOBAL_FLAGS = ("-v", "--verbose", "--debug")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    lead = 0
    while lead < len(argv) and argv[lead] in _GLOBAL_FLAGS:
        lead += 1
    if lead < len(argv) and argv[lead] == "convert":
        from villa_fast.data.convert import main as convert_main

        flags = argv[:lead]
        rest = [*(["-v"] if {"-v", "--verbose"} & set(flags) else []), *argv[lead + 1 :]]
        return convert_main(rest, prog="villa-fast convert", report_errors=True, debug="--debug" in flags)
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s: %(message)s"
    )
    return run_reporting_errors(lambda: _run(args), debug=args.debug)


def _run(args) -> int:
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
    return 1


if __name__ == "__main__":
    sys.exit(main())
