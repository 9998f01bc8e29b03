"""The command line: --print-config, overrides, errors, train -> evaluate --robust, bench, demo."""

from __future__ import annotations

import json

import pytest

from tests.test_train_fixtures import task_config
from villa_fast.cli import main


def test_print_config_touches_nothing(tmp_path, capsys):
    cfg = {"train_txt_dbs": ["/nowhere/train.db"], "train_img_dbs": ["/nowhere/img"], "learning_rate": 8e-5}
    p = tmp_path / "train-vqa-base.json"
    p.write_text(json.dumps(cfg))
    rc = main(["train", "--config", str(p), "--print-config", "--learning_rate", "1e-4", "--adv-training"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "vqa"
    assert out["learning_rate"] == 1e-4 and out["adv_training"] is True
    assert out["train_txt_dbs"] == ["/nowhere/train.db"] and out["gradient_accumulation_steps"] == 1
    assert list(out)[:2] == ["task", "model_config"]


def test_list_and_bool_flags(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"task": "vcr", "fp16": True}))
    main(["train", "--config", str(p), "--print-config", "--adv_modality", "image", "text", "--no-fp16"])
    out = json.loads(capsys.readouterr().out)
    assert out["adv_modality"] == ["image", "text"] and out["fp16"] is False


def test_bad_config_exits_with_the_key(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"task": "vqa", "warmup_step": 10}))
    assert main(["train", "--config", str(p), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "warmup_step" in err and "warmup_steps" in err


def test_train_then_evaluate_robust(tmp_path, capsys):
    cfg = task_config(tmp_path, "vqa", adv_training=True)
    p = tmp_path / "run.json"
    p.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(p)]) == 0
    out = capsys.readouterr().out
    assert "vqa after 4 steps" in out and "acc" in out
    assert (tmp_path / "out" / "log" / "training_curves.png").stat().st_size > 1000
    ckpt = tmp_path / "out" / "ckpt" / "step_4"
    pred = tmp_path / "new" / "dir" / "pred"  # a folder that does not exist yet is made
    argv = ["evaluate", "--config", str(p), "--weights", str(ckpt), "--robust", "--attack_steps", "2"]
    rc = main([*argv, "--predictions", str(pred)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "robust_acc" in out and "2-step l2 attack" in out
    rows = json.loads((pred.parent / "pred.json").read_text())
    metrics = json.loads((pred.parent / "pred.metrics.json").read_text())
    assert rows and {"question_id", "answer"} <= set(rows[0]) and len(rows) == metrics["n"]


def test_tensorboard_logs(tmp_path):
    from villa_fast.train.config import resolve_config
    from villa_fast.train.trainer import Trainer

    cfg = resolve_config(None, task_config(tmp_path, "ve", tensorboard=True))
    trainer = Trainer(cfg, quiet=True)
    trainer.train()
    trainer.close()
    assert list((tmp_path / "out" / "log").glob("events.out.tfevents.*"))
    lines = (tmp_path / "out" / "log" / "history.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 1


def test_convert_is_forwarded(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--help"])
    assert exc.value.code == 0
    assert "txt_db" in capsys.readouterr().out


def test_bench_runs(capsys):
    assert main(["bench", "--steps", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "standard" in out and "VILLA K=3" in out


@pytest.mark.slow
def test_demo_end_to_end_short(tmp_path):
    import io

    from villa_fast.train.demo import run_demo

    buf = io.StringIO()
    res = run_demo(tmp_path / "demo", steps=4, quiet=True, out=buf, max_val_examples=64)
    text = buf.getvalue()
    assert "clean acc %" in text and "robust acc %" in text and "VILLA" in text
    assert (tmp_path / "demo" / "training_curves.png").is_file()
    for run in ("standard", "villa"):
        assert 0.0 <= res[run]["acc"] <= 1.0 and 0.0 <= res[run]["robust_acc"] <= 1.0
    # a second demo in the same directory replaces the first one's runs
    run_demo(tmp_path / "demo", steps=2, quiet=True, out=io.StringIO(), max_val_examples=64)
    for run in ("standard", "villa"):
        ckpt = tmp_path / "demo" / run / "ckpt"
        assert sorted(p.name for p in ckpt.iterdir()) == ["model_final.safetensors", "step_2"]
        history = (tmp_path / "demo" / run / "log" / "history.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in history if "loss" in json.loads(x)] == [2]


def test_a_new_run_in_a_used_output_dir_says_how_to_proceed(tmp_path, capsys):
    cfg = task_config(tmp_path, "ve", num_train_steps=2, valid_steps=2)
    p = tmp_path / "run.json"
    p.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(p)]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(p), "--seed", "8"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "out") in err and "--resume" in err and "output_dir" in err
    assert main(["train", "--config", str(p), "--resume"]) == 0


def test_training_curves_are_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch, caplog):
    import builtins
    import logging

    from villa_fast.train.report import plot_curves

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with caplog.at_level(logging.WARNING, logger="villa_fast.train"):
        assert plot_curves({"run": [{"step": 1, "loss": 1.0}]}, tmp_path / "c.png") is None
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "c.png").exists()
