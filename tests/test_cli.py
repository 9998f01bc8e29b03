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
        assert sorted(p.name for p in ckpt.iterdir()) == ["ans2label.json", "model_final.safetensors", "step_2"]
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


# -- evaluate: which weights -------------------------------------------------------------------------------------


def _trained(tmp_path, capsys, task="ve", **changes):
    cfg = task_config(tmp_path, task, num_train_steps=2, valid_steps=2, **changes)
    p = tmp_path / "run.json"
    p.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(p)]) == 0
    capsys.readouterr()
    return p, tmp_path / "out" / "ckpt"


def _acc(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("acc"))


def test_evaluate_uses_the_checkpoint_key_and_refuses_random_weights(tmp_path, capsys):
    p, ckpt = _trained(tmp_path, capsys)
    assert main(["evaluate", "--config", str(p), "--weights", str(ckpt / "step_2")]) == 0
    by_weights = _acc(capsys.readouterr().out)
    # no --weights: the config's (here --checkpoint's) weights, not a random initialisation
    assert main(["evaluate", "--config", str(p), "--checkpoint", str(ckpt / "model_final.safetensors")]) == 0
    assert _acc(capsys.readouterr().out) == by_weights
    # neither: refused, naming both ways to give weights
    assert main(["evaluate", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and "'checkpoint'" in err and "random" in err


def test_evaluate_checks_the_weights_before_building_the_model(tmp_path, capsys, monkeypatch):
    import villa_fast.train.trainer as trainer_mod

    cfg = task_config(tmp_path, "ve")
    p = tmp_path / "run.json"
    p.write_text(json.dumps(cfg))

    def no_trainer(*a, **k):
        raise AssertionError("the Trainer was built before the weights were checked")

    monkeypatch.setattr(trainer_mod, "Trainer", no_trainer)
    assert main(["evaluate", "--config", str(p), "--weights", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--weights" in err and str(tmp_path / "nope") in err and "Traceback" not in err
    assert main(["evaluate", "--config", str(p), "--checkpoint", str(tmp_path / "absent.pt")]) == 2
    assert "key 'checkpoint'" in capsys.readouterr().err


def test_evaluate_refuses_weights_without_the_task_head(tmp_path, capsys):
    from villa_fast.models import UniterConfig, UniterModel, save_safetensors

    cfg = task_config(tmp_path, "ve")
    p = tmp_path / "run.json"
    p.write_text(json.dumps(cfg))
    pre = tmp_path / "pretrained.safetensors"  # an encoder only, as a pre-trained checkpoint
    save_safetensors(UniterModel(UniterConfig.from_json_file(cfg["model_config"])), pre)
    assert main(["evaluate", "--config", str(p), "--weights", str(pre)]) == 2
    err = capsys.readouterr().err
    assert str(pre) in err and "lacks" in err and "task head" in err


# -- user errors: one line and exit 2; bugs keep their traceback ---------------------------------------------------


def test_non_finite_override_and_directory_config_are_config_errors(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"task": "vqa"}))
    assert main(["train", "--config", str(p), "--print-config", "--learning_rate", "nan"]) == 2
    assert "'learning_rate' must be a finite number" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path) + "/", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and "is a directory" in err


def test_a_missing_database_is_one_line_not_a_traceback(tmp_path, capsys):
    cfg = task_config(tmp_path, "ve")
    cfg["train_txt_dbs"] = [str(tmp_path / "no_such_db")]
    p = tmp_path / "run.json"
    p.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no_such_db" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError):  # --debug shows where
        main(["--debug", "train", "--config", str(p), "--output_dir", str(tmp_path / "out2")])


def test_bugs_keep_their_traceback(monkeypatch):
    import villa_fast.cli as cli

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_cmd_bench", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["bench", "--device", "cpu"])


def test_bench_rejects_bad_steps_and_an_unusable_device(capsys, monkeypatch):
    import torch

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--steps", "0"])
    assert exc.value.code == 2 and "positive integer" in capsys.readouterr().err
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device 'cuda'" in err and "no CUDA support" in err
    assert main(["bench", "--device", "gpu0"]) == 2
    assert "not a device" in capsys.readouterr().err


def test_resume_skips_a_truncated_newest_checkpoint(tmp_path, capsys):
    p, ckpt = _trained(tmp_path, capsys, save_steps=1, keep_checkpoints=0)
    state = ckpt / "step_2" / "train_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    (ckpt / ".step_3.x1y2z3").mkdir()  # a killed run's temporary checkpoint
    assert main(["train", "--config", str(p), "--resume"]) == 0
    assert "after 2 steps" in capsys.readouterr().out
    # resumed from step 1, step 2 trained and saved again, the unreadable one kept aside, the leftover gone
    names = sorted(x.name for x in ckpt.iterdir())
    assert names == ["model_final.safetensors", "step_1", "step_2", "step_2.unreadable"]


# -- convert --------------------------------------------------------------------------------------------------


def _convert_inputs(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "it"]))
    jsonl = tmp_path / "q.jsonl"
    good = {"id": "q0", "question": "what is it", "img_fname": "im0.npz", "target": {"labels": [0], "scores": [1]}}
    jsonl.write_text(json.dumps(good) + "\n{not json\n")
    return vocab, jsonl, good


def test_a_failed_convert_leaves_nothing_so_the_rerun_works(tmp_path, capsys):
    vocab, jsonl, good = _convert_inputs(tmp_path)
    out = tmp_path / "txt_db"
    argv = ["convert", "txt", "--task", "vqa", "--jsonl", str(jsonl), "--vocab", str(vocab), "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "q.jsonl:2" in err and "Traceback" not in err
    assert not out.exists()
    # an empty directory the user made is kept, emptied of what the failed run wrote
    out.mkdir()
    assert main(argv) == 2
    assert out.is_dir() and not list(out.iterdir())
    jsonl.write_text(json.dumps(good) + "\n")
    assert main(argv) == 0
    assert "wrote 1 examples" in capsys.readouterr().out
    # a database already there is never removed by a failed run
    written = sorted(x.name for x in out.iterdir())
    assert main(argv) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(x.name for x in out.iterdir()) == written


def test_a_failed_image_convert_keeps_the_other_databases_in_the_directory(tmp_path, capsys):
    import numpy as np

    npz = tmp_path / "npz"
    npz.mkdir()
    feats = dict(features=np.zeros((4, 8), np.float32), norm_bb=np.zeros((4, 6), np.float32), conf=np.ones(4))
    np.savez(npz / "im0.npz", **feats)
    out = tmp_path / "img_db"
    base = ["convert", "img", "--npz-dir", str(npz), "--output", str(out), "--min-bb", "1"]
    assert main(base) == 0
    before = sorted(x.name for x in out.iterdir())
    np.savez(npz / "im1.npz", features=np.zeros((4, 8), np.float32))  # no norm_bb / conf
    assert main([*base, "--no-compress"]) == 2
    assert "missing arrays" in capsys.readouterr().err
    assert sorted(x.name for x in out.iterdir()) == before


def test_convert_txt_without_vocab_says_it_is_required(tmp_path, capsys):
    _, jsonl, _ = _convert_inputs(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["convert", "txt", "--task", "vqa", "--jsonl", str(jsonl), "--output", str(tmp_path / "t")])
    assert exc.value.code == 2
    assert "--vocab is required" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_a_config_without_task_or_output_dir_is_a_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text("{}")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "the task is not known" in capsys.readouterr().err
    assert main(["evaluate", "--config", str(cfg)]) == 2
    assert "the task is not known" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--task", "vqa"]) == 2
    assert "'output_dir' is required" in capsys.readouterr().err


def test_evaluate_reads_the_answer_vocabulary_its_training_run_kept(tmp_path, capsys):
    import shutil

    p, _ = _trained(tmp_path, capsys, task="vqa")
    cfg = json.loads(p.read_text())
    # an evaluation config without training data or 'ans2label', on a copy of the val db without a vocabulary
    val = tmp_path / "val_copy"
    shutil.copytree(cfg["val_txt_db"], val)
    (val / "ans2label.json").unlink(missing_ok=True)
    ev = {k: v for k, v in cfg.items() if not k.startswith("train_")}
    ev["val_txt_db"] = str(val)
    q = tmp_path / "eval.json"
    q.write_text(json.dumps(ev))
    assert main(["evaluate", "--config", str(q), "--weights", str(tmp_path / "out" / "ckpt" / "step_2")]) == 0
    assert "acc" in capsys.readouterr().out
    assert (
        main(["evaluate", "--config", str(q), "--weights", str(tmp_path / "out" / "ckpt" / "model_final.safetensors")])
        == 0
    )
