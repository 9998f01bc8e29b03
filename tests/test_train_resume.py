"""Exact resume: a training process killed midway and resumed ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_fixtures import task_config

ROOT = Path(__file__).resolve().parent.parent


def _cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "villa_fast", "-v", "train", "--config", str(config), *extra]


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _config(tmp_path: Path, name: str, base: dict) -> Path:
    cfg = dict(base)
    cfg.update(
        output_dir=str(tmp_path / name),
        num_train_steps=300,
        warmup_steps=30,
        save_steps=20,
        keep_checkpoints=0,
        log_steps=10,
        gradient_accumulation_steps=2,
        dropout=0.1,
    )
    for key in ("val_txt_db", "val_img_db"):
        cfg.pop(key)
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(cfg))
    return p


@pytest.mark.slow
def test_killed_and_resumed_run_is_bitwise_equal(tmp_path):
    base = task_config(tmp_path / "data", "vqa", adv_training=True)
    ref_cfg = _config(tmp_path, "ref", base)
    run_cfg = _config(tmp_path, "run", base)
    subprocess.run(_cmd(ref_cfg), check=True, env=_env(), cwd=ROOT, capture_output=True, timeout=600)

    proc = subprocess.Popen(_cmd(run_cfg), env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = tmp_path / "run" / "ckpt"
    deadline = time.monotonic() + 300
    while not (ckpt / "step_40").is_dir():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "ckpt" / "model_final.safetensors").exists()
    killed_at = max(int(p.name.split("_")[1]) for p in ckpt.glob("step_*"))
    assert killed_at < 300

    res = subprocess.run(_cmd(run_cfg, "--resume"), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed from {ckpt / f'step_{killed_at}'} at step {killed_at}" in res.stderr

    a = load_file(str(tmp_path / "ref" / "ckpt" / "model_final.safetensors"))
    b = load_file(str(tmp_path / "run" / "ckpt" / "model_final.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed history continues the uninterrupted one
    ref_hist = [json.loads(x) for x in (tmp_path / "ref" / "log" / "history.jsonl").read_text().splitlines()]
    state = torch.load(ckpt / "step_300" / "train_state.pt", weights_only=True)
    assert [e["loss"] for e in state["history"]] == [e["loss"] for e in ref_hist]


def test_checkpoint_state_loads_with_weights_only(tmp_path):
    from villa_fast.train.config import resolve_config
    from villa_fast.train.trainer import Trainer

    cfg = resolve_config(None, task_config(tmp_path, "nlvr2", adv_training=True, num_train_steps=2, valid_steps=2))
    trainer = Trainer(cfg, quiet=True)
    trainer.train()
    path = tmp_path / "out" / "ckpt" / "step_2"
    state = torch.load(path / "train_state.pt", weights_only=True)
    assert set(state) >= {"step", "optimizer", "schedule", "scaler", "rng", "data", "history"}
    assert state["step"] == 2 and state["data"]["batch_index"] >= 2
    # no stray temporary files from the atomic writes
    assert sorted(p.name for p in path.iterdir()) == ["checksums.json", "model.safetensors", "train_state.pt"]
    assert not [p for p in (tmp_path / "out" / "ckpt").iterdir() if p.name.startswith(".")]


def test_resume_between_log_steps_logs_what_the_uninterrupted_run_logs(tmp_path, monkeypatch):
    """A checkpoint between two log entries carries the log window (summed losses, micro-batch count, left-out
    adversarial steps): the resumed run's entries equal the uninterrupted run's, and history.jsonl drops the
    entries the interrupted run wrote after its last checkpoint."""
    from villa_fast.train.config import resolve_config
    from villa_fast.train.trainer import Trainer

    def cfg(name):
        c = task_config(tmp_path / name, "vqa", adv_training=True, num_train_steps=9, valid_steps=100)
        c.update(log_steps=3, save_steps=4, keep_checkpoints=0, gradient_accumulation_steps=2)
        return resolve_config(None, c)

    def losses(entries):
        return [(e["step"], e["loss"], e["adv_skipped"]) for e in entries if "loss" in e]

    ref = losses(Trainer(cfg("ref"), quiet=True).train())
    assert [s for s, _, _ in ref] == [3, 6, 9]

    class Killed(Exception):
        pass

    real_save = Trainer.save

    def save_then_die(self):
        out = real_save(self)
        if self.global_step == 4:
            # the run also logged an entry at step 3; it dies after the step-4 checkpoint, before step 6's entry
            raise Killed
        return out

    monkeypatch.setattr(Trainer, "save", save_then_die)
    run = cfg("run")
    with pytest.raises(Killed):
        Trainer(run, quiet=True).train()
    monkeypatch.setattr(Trainer, "save", real_save)
    hist_file = tmp_path / "run" / "out" / "log" / "history.jsonl"
    # a stray entry written after the checkpoint (as a killed run can leave) is dropped on resume
    with open(hist_file, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": 5, "loss": 123.0, "adv_skipped": 0}) + "\n")
    state = torch.load(tmp_path / "run" / "out" / "ckpt" / "step_4" / "train_state.pt", weights_only=True)
    assert state["log_window"]["micro_batches"] == 2  # step 4's two micro-batches, not yet logged

    resumed = Trainer(run, resume=True, quiet=True)
    assert losses(resumed.train()) == ref
    logged = [json.loads(x) for x in hist_file.read_text().splitlines()]
    assert losses(logged) == ref


# -- unreadable checkpoints, leftovers of killed runs, durable writes --------------------------------------------


def _tiny_checkpoints(ckpt: Path, steps=(1, 2)):
    from tests.test_models import tiny_config
    from villa_fast.models import UniterModel
    from villa_fast.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = UniterModel(tiny_config())
    for s in steps:
        save_checkpoint(ckpt, s, model, {"step": s, "w": torch.arange(100.0)})
    return model


@pytest.mark.parametrize("damage", ["truncated_state", "empty_state", "empty_weights", "truncated_weights"])
def test_an_unreadable_checkpoint_names_its_path_and_step(tmp_path, damage):
    from villa_fast.train.checkpoint import CheckpointReadError, load_checkpoint

    model = _tiny_checkpoints(tmp_path / "ckpt", steps=(2,))
    step = tmp_path / "ckpt" / "step_2"
    f = step / ("train_state.pt" if "state" in damage else "model.safetensors")
    data = f.read_bytes()
    f.write_bytes(b"" if damage.startswith("empty") else data[: len(data) // 2])
    with pytest.raises(CheckpointReadError) as exc:
        load_checkpoint(step, model)
    msg = str(exc.value)
    assert str(step) in msg and "(step 2)" in msg and f.name in msg
    assert "weights_only" not in msg
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "ckpt" / "step_9", model)


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog):
    import logging

    from villa_fast.train.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = tmp_path / "ckpt"
    model = _tiny_checkpoints(ckpt, steps=(1, 2, 3))
    for s, name in ((3, "train_state.pt"), (2, "model.safetensors")):
        f = ckpt / f"step_{s}" / name
        f.write_bytes(f.read_bytes()[:-100])  # a copy cut short / a power loss on a disk without a real fsync
    with caplog.at_level(logging.WARNING, logger="villa_fast.train.checkpoint"):
        assert latest_checkpoint(ckpt) == ckpt / "step_1"
    assert "step 3" in caplog.text and "step 2" in caplog.text and "step_1" in caplog.text
    # the unreadable ones are kept aside, out of the way of resume and pruning
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_1", "step_2.unreadable", "step_3.unreadable"]
    assert load_checkpoint(ckpt / "step_1", model)["step"] == 1
    # with no complete checkpoint the newest is returned, and loading it says what is wrong
    (ckpt / "step_1" / "train_state.pt").write_bytes(b"")
    assert latest_checkpoint(ckpt) == ckpt / "step_1"


def _flip_a_byte(f: Path, value: float) -> None:
    """Change one bit inside the stored float32 ``value`` (a bit flip on the disk: every length stays)."""
    import struct

    data = bytearray(f.read_bytes())
    at = bytes(data).find(struct.pack("<f", value))
    assert at > 0
    data[at + 2] ^= 0x01
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("legacy", [False, True], ids=["with_checksums", "without_checksums"])
def test_a_changed_byte_in_a_checkpoint_is_caught_not_loaded(tmp_path, caplog, legacy):
    import logging

    from villa_fast.train.checkpoint import CheckpointReadError, latest_checkpoint, load_checkpoint

    ckpt = tmp_path / "ckpt"
    model = _tiny_checkpoints(ckpt, steps=(1, 2))
    if legacy:  # written before checkpoints recorded their checksums: the zip's own CRCs still guard the state
        for s in (1, 2):
            (ckpt / f"step_{s}" / "checksums.json").unlink()
    assert load_checkpoint(ckpt / "step_2", model)["step"] == 2
    # torch.load reads a changed value without complaint: 50.0 in the saved tensor becomes another number
    _flip_a_byte(ckpt / "step_2" / "train_state.pt", 50.0)
    with pytest.raises(CheckpointReadError, match=r"\(step 2\).*train_state\.pt"):
        load_checkpoint(ckpt / "step_2", model)
    with caplog.at_level(logging.WARNING, logger="villa_fast.train.checkpoint"):
        assert latest_checkpoint(ckpt) == ckpt / "step_1"
    assert "step 2" in caplog.text and ("CRC-32" in caplog.text)
    assert load_checkpoint(ckpt / "step_1", model)["w"].equal(torch.arange(100.0))
    if not legacy:  # the weights have no checksum of their own: only the recorded one catches a change there
        weights = ckpt / "step_1" / "model.safetensors"
        value = float(model.state_dict()["embeddings.word_embeddings.weight"][3, 5])
        _flip_a_byte(weights, value)
        with pytest.raises(CheckpointReadError, match=r"\(step 1\).*model\.safetensors.*changed"):
            load_checkpoint(ckpt / "step_1", model)


def test_leftovers_of_killed_runs_are_removed_on_save_and_resume(tmp_path):
    from villa_fast.train.checkpoint import latest_checkpoint

    ckpt = tmp_path / "ckpt"
    model = _tiny_checkpoints(ckpt, steps=(1,))
    ours = [".step_2.k3j_x9a", ".stale_step_1.4242", ".model_final.safetensors.abc123"]
    for name in ours[:2]:
        (ckpt / name).mkdir()
        (ckpt / name / "model.safetensors").write_bytes(b"x" * 100)
    (ckpt / ours[2]).write_bytes(b"x")
    theirs = [".step_notes", "step_1.bak", ".hidden", "notes.txt"]  # not the library's temporary naming
    for name in theirs:
        (ckpt / name).write_text("keep")
    assert latest_checkpoint(ckpt) == ckpt / "step_1"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(["step_1", *theirs])
    (ckpt / ours[0]).mkdir()
    _tiny_checkpoints(ckpt, steps=(2,))  # a save removes them too
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(["step_1", "step_2", *theirs])
    del model


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fsynced descriptors")
def test_checkpoint_files_and_directories_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    ckpt = tmp_path / "ckpt"
    _tiny_checkpoints(ckpt, steps=(5,))
    names = [Path(p).name for p in synced]
    # each file's data before its rename, the directory holding the renamed files, the parent after the final rename
    assert any(n.startswith(".model.safetensors.") for n in names)
    assert any(n.startswith(".train_state.pt.") for n in names)
    assert any(n.startswith(".checksums.json.") for n in names)
    assert any(n.startswith(".step_5.") for n in names)
    assert synced[-1] == str(ckpt)
