"""A resume is checked before anything is loaded or written: a refused one leaves the run as it was, and a changed
model, task, answer vocabulary or number of processes is a one-line error, not a traceback. Checkpoint writes on a
full or read-only disk say what happened; re-saving a step never loses both copies of it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import zlib
from pathlib import Path

import pytest
import torch

import villa_fast.train.checkpoint as ck
from tests.test_train_fixtures import task_config, tiny_model_config
from villa_fast.cli import main
from villa_fast.models.checkpoint import CheckpointFormatError, CheckpointMismatchError
from villa_fast.train.config import ConfigError, resolve_config
from villa_fast.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

#: the files a resume must not rewrite before it is accepted
_RUN_FILES = ("log/hps.json", "log/model.json", "ckpt/ans2label.json", "log/history.jsonl")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """A finished 2-step VQA run (checkpoint step_2) and its config; tests copy it (:func:`_copy_run`)."""
    root = tmp_path_factory.mktemp("vqa_run")
    cfg = task_config(root, "vqa", num_train_steps=2, valid_steps=2, keep_checkpoints=0)
    for key in ("val_txt_db", "val_img_db"):
        cfg.pop(key)
    Trainer(resolve_config(None, cfg), quiet=True).train()
    return root, cfg


def _copy_run(trained, tmp_path: Path) -> dict:
    """The trained run copied to ``tmp_path/out``; returns its config (official keys) pointing there."""
    root, cfg = trained
    shutil.copytree(root / "out", tmp_path / "out")
    return {**cfg, "output_dir": str(tmp_path / "out")}


def _snapshot(out: Path) -> dict[str, bytes]:
    return {rel: (out / rel).read_bytes() for rel in _RUN_FILES}


def _resume(cfg: dict, **changes) -> Trainer:
    trainer = Trainer(resolve_config(None, {**cfg, **changes}), resume=True, quiet=True)
    trainer.train()
    return trainer


def _vocab(path: Path, vocab: dict) -> str:
    path.write_text(json.dumps(vocab))
    return str(path)


# -- a refused resume writes nothing ----------------------------------------------------------------------------------
def test_a_refused_resume_leaves_the_run_files_as_they_were(trained, tmp_path):
    cfg = _copy_run(trained, tmp_path)
    out = tmp_path / "out"
    before = _snapshot(out)
    other = _vocab(tmp_path / "other.json", {f"x{k}": k for k in range(5)})
    with pytest.raises(ConfigError, match="learning_rate"):
        _resume(cfg, learning_rate=0.5, seed=99, ans2label=other)
    assert _snapshot(out) == before
    # nor does one refused for its model (the comparison runs before the weights would load)
    wider = tiny_model_config(tmp_path / "wide.json", hidden=64)
    with pytest.raises(ConfigError, match="hidden_size"):
        _resume(cfg, model_config=wider)
    assert _snapshot(out) == before


def test_a_resume_with_another_answer_vocabulary_is_refused(trained, tmp_path):
    cfg = _copy_run(trained, tmp_path)
    kept = tmp_path / "out" / "ckpt" / "ans2label.json"
    before = kept.read_bytes()
    swapped = _vocab(tmp_path / "swapped.json", {"a1": 0, "a0": 1, "a2": 2, "a3": 3, "a4": 4})
    with pytest.raises(ConfigError) as exc:
        _resume(cfg, ans2label=swapped)  # otherwise the same config: the resume itself would be accepted
    msg = str(exc.value)
    assert str(kept) in msg and swapped in msg and "2 answers differ" in msg and f"--ans2label {kept}" in msg
    assert kept.read_bytes() == before
    # the same answers under the same labels pass, from another file and in another order
    same = _vocab(tmp_path / "same.json", {f"a{k}": k for k in reversed(range(5))})
    assert _resume(cfg, ans2label=same).global_step == 2
    assert json.loads(kept.read_text()) == {f"a{k}": k for k in range(5)}


def test_the_run_description_is_replaced_atomically(trained, tmp_path, monkeypatch):
    cfg = _copy_run(trained, tmp_path)
    replaced = []
    real = os.replace

    def record(src, dst):
        replaced.append(Path(dst).name)
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", record)
    _resume(cfg, log_steps=2)
    assert {"hps.json", "model.json", "ans2label.json"} <= set(replaced)
    assert json.loads((tmp_path / "out" / "log" / "hps.json").read_text())["log_steps"] == 2
    assert not [p for p in (tmp_path / "out" / "log").iterdir() if p.name.startswith(".")]


# -- another model, task or number of processes -----------------------------------------------------------------------
def test_a_resume_with_another_layer_count_is_a_config_error(trained, tmp_path):
    cfg = _copy_run(trained, tmp_path)
    deeper = tiny_model_config(tmp_path / "deep.json", layers=2)
    with pytest.raises(ConfigError, match=r"model_config: \{'num_hidden_layers': 1\} in the checkpoint"):
        _resume(cfg, model_config=deeper)


def test_a_resume_with_another_tasks_config_in_a_vqa_run_is_a_config_error(trained, tmp_path):
    cfg = _copy_run(trained, tmp_path)
    nlvr2 = task_config(tmp_path / "nlvr2", "nlvr2", num_train_steps=2, output_dir=cfg["output_dir"])
    before = _snapshot(tmp_path / "out")
    with pytest.raises(ConfigError, match="task: 'vqa' in the checkpoint, 'nlvr2' now"):
        _resume(nlvr2)
    assert _snapshot(tmp_path / "out") == before


def test_a_checkpoint_of_another_number_of_processes_is_a_config_error(trained, tmp_path):
    cfg = _copy_run(trained, tmp_path)
    step = tmp_path / "out" / "ckpt" / "step_2"
    state = torch.load(step / "train_state.pt", weights_only=True)
    state["world_size"] = 2
    torch.save(state, step / "train_state.pt")
    sums = {n: zlib.crc32((step / n).read_bytes()) for n in ("model.safetensors", "train_state.pt")}
    (step / "checksums.json").write_text(json.dumps(sums))
    with pytest.raises(ConfigError, match="written by a run with 2 processes and this run has 1.*with 2 processes"):
        _resume(cfg)


def test_weights_of_another_model_are_a_checkpoint_error_with_counts_and_keys(trained, tmp_path):
    from villa_fast.train.checkpoint import load_checkpoint

    root, cfg = trained
    step = root / "out" / "ckpt" / "step_2"
    cfg = {**cfg, "output_dir": str(tmp_path / "unused")}
    wide = Trainer(resolve_config(None, {**cfg, "model_config": tiny_model_config(tmp_path / "w.json", hidden=64)}))
    with pytest.raises(CheckpointMismatchError) as exc:
        load_checkpoint(step, wide.model)
    msg = str(exc.value)
    assert isinstance(exc.value, CheckpointFormatError)
    assert str(step) in msg and "(step 2)" in msg and "of another shape" in msg and "32 in the file, 64" in msg
    assert "uniter.embeddings" in msg and " ..." in msg and "model_config" in msg
    deep = Trainer(resolve_config(None, {**cfg, "model_config": tiny_model_config(tmp_path / "d.json", layers=2)}))
    with pytest.raises(CheckpointMismatchError, match=r"\d+ missing \(uniter\.encoder\.layer\.1\."):
        load_checkpoint(step, deep.model)


def test_evaluate_a_checkpoint_with_another_model_config_is_one_line(trained, tmp_path, capsys):
    root, cfg = trained
    p = tmp_path / "run.json"
    p.write_text(json.dumps({**cfg, "val_txt_db": str(root / "data" / "txt_val"), "val_img_db": cfg["train_img_db"]}))
    wide = tiny_model_config(tmp_path / "wide.json", hidden=64)
    step = root / "out" / "ckpt" / "step_2"
    assert main(["evaluate", "--config", str(p), "--weights", str(step), "--model_config", wide]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "does not fit" in err and str(step) in err


# -- disk problems --------------------------------------------------------------------------------------------------
def _tiny_model():
    from tests.test_models import tiny_config
    from villa_fast.models import UniterModel

    torch.manual_seed(0)
    return UniterModel(tiny_config())


def _leftovers(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("failure", ["zip_writer", "enospc"])
def test_a_full_disk_during_a_checkpoint_names_it_and_keeps_the_earlier_ones(tmp_path, monkeypatch, failure):
    ckpt = tmp_path / "ckpt"
    model = _tiny_model()
    ck.save_checkpoint(ckpt, 1, model, {"step": 1})
    real_save = torch.save

    def fill_the_disk(obj, f, *a, **kw):
        Path(f).write_bytes(b"x" * 1000)  # a partial file, left for the writer's caller to remove
        if failure == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        # what torch's zip writer raises on a full disk: no errno, only the free space tells
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 13760 vs 13654")

    usage = shutil.disk_usage(tmp_path)
    free = 0 if failure == "zip_writer" else usage.free
    monkeypatch.setattr(ck.torch, "save", fill_the_disk)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage._replace(free=free))
    with pytest.raises(OSError) as exc:
        ck.save_checkpoint(ckpt, 2, model, {"step": 2})
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(ckpt / "step_2")
    msg = exc.value.strerror
    assert "step 2 checkpoint was not written" in msg and "(step_1) are intact" in msg and "--resume" in msg
    assert _leftovers(ckpt) == [] and sorted(p.name for p in ckpt.iterdir()) == ["step_1"]
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert ck.load_checkpoint(ckpt / "step_1", model)["step"] == 1


def test_another_write_failure_is_not_called_a_full_disk(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    model = _tiny_model()

    def broken(obj, f, *a, **kw):
        Path(f).write_bytes(b"x")
        raise RuntimeError("a writer bug")

    monkeypatch.setattr(ck.torch, "save", broken)
    with pytest.raises(RuntimeError, match="a writer bug"):
        ck.save_checkpoint(ckpt, 1, model, {"step": 1})
    assert list(ckpt.iterdir()) == []


def test_a_full_disk_through_the_cli_is_one_line(trained, tmp_path, monkeypatch, capsys):
    root, cfg = trained
    p = tmp_path / "run.json"
    p.write_text(json.dumps({**cfg, "output_dir": str(tmp_path / "out")}))
    usage = shutil.disk_usage(tmp_path)

    def full(obj, f, *a, **kw):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")

    monkeypatch.setattr(ck.torch, "save", full)
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: usage._replace(free=0))
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    step = tmp_path / "out" / "ckpt" / "step_2"
    assert err.startswith(f"error: {step}: No space left on device: the step 2 checkpoint") and err.count("\n") == 1


def test_a_full_disk_while_logging_names_the_history_file(trained, tmp_path, monkeypatch, capsys):
    # the write's own error carries no file name (ENOSPC from write()): the log names it, in one line
    import villa_fast.train.trainer as tr

    root, cfg = trained
    p = tmp_path / "run.json"
    p.write_text(json.dumps({**cfg, "output_dir": str(tmp_path / "out")}))
    real_open = open

    def full_open(path, mode="r", *a, **kw):
        fh = real_open(path, mode, *a, **kw)
        if str(path).endswith("history.jsonl") and "a" in mode:
            fh.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fh

    monkeypatch.setattr(tr, "open", full_open, raising=False)
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    want = tmp_path / "out" / "log" / "history.jsonl"
    assert err == f"error: {want}: {os.strerror(errno.ENOSPC)}\n"


def test_a_read_only_output_dir_is_one_line(trained, tmp_path, monkeypatch, capsys):
    root, cfg = trained
    out = tmp_path / "ro" / "out"
    p = tmp_path / "run.json"
    p.write_text(json.dumps({**cfg, "output_dir": str(out)}))
    real = Path.mkdir

    def read_only(self, *a, **kw):  # what mkdir raises on a file system mounted read-only
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith(": Read-only file system\n") and str(tmp_path / "ro") in err
    with pytest.raises(OSError):  # --debug shows where
        main(["--debug", "train", "--config", str(p)])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a directory whatever its permissions")
def test_an_unwritable_output_dir_is_one_line(trained, tmp_path, capsys):
    root, cfg = trained
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    p = tmp_path / "run.json"
    p.write_text(json.dumps({**cfg, "output_dir": str(locked / "out")}))
    try:
        assert main(["train", "--config", str(p)]) == 2
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err
    assert err.startswith(f"error: {locked / 'out'}") and "Permission denied" in err


def test_oserrors_without_a_file_name_keep_their_traceback():
    from villa_fast.cli import run_reporting_errors

    def broken():
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(OSError):
        run_reporting_errors(broken)


# -- re-saving a step -------------------------------------------------------------------------------------------
def test_an_interrupted_resave_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    model = _tiny_model()
    ck.save_checkpoint(ckpt, 1, model, {"step": 1, "which": torch.tensor(1)})
    real = os.replace

    def interrupted(src, dst):
        # the new checkpoint's rename into place, right after the old one was set aside
        if Path(src).name.startswith(".step_1.") and Path(dst).name == "step_1":
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(ck.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(ckpt, 1, model, {"step": 1, "which": torch.tensor(2)})
    monkeypatch.setattr(ck.os, "replace", real)
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_1"]
    assert int(ck.load_checkpoint(ckpt / "step_1", model)["which"]) == 1


def test_a_checkpoint_set_aside_by_a_killed_resave_is_put_back(tmp_path):
    ckpt = tmp_path / "ckpt"
    model = _tiny_model()
    ck.save_checkpoint(ckpt, 1, model, {"step": 1})
    ck.save_checkpoint(ckpt, 2, model, {"step": 2})
    # killed between the renames: step_2 set aside, the new one still under its temporary name
    os.replace(ckpt / "step_2", ckpt / ".stale_step_2.4242")
    (ckpt / ".step_2.abc123").mkdir()
    assert ck.latest_checkpoint(ckpt) == ckpt / "step_2"
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_1", "step_2"]
    assert ck.load_checkpoint(ckpt / "step_2", model)["step"] == 2
    # a set-aside copy of a step that is in place is an old one: removed
    shutil.copytree(ckpt / "step_1", ckpt / ".stale_step_1.4242")
    assert ck.remove_leftovers(ckpt) == [ckpt / ".stale_step_1.4242"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_1", "step_2"]
    # a set-aside copy left incomplete (killed while being deleted) is never put back: removed as a leftover
    shutil.rmtree(ckpt / "step_2")
    (ckpt / ".stale_step_2.77").mkdir()
    shutil.copy(ckpt / "step_1" / "checksums.json", ckpt / ".stale_step_2.77" / "checksums.json")
    assert ck.remove_leftovers(ckpt) == [ckpt / ".stale_step_2.77"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step_1"]


def test_files_written_atomically_get_the_modes_of_a_plain_write(tmp_path):
    old = os.umask(0o022)
    try:
        ck.atomic_write_text(tmp_path / "hps.json", "{}")
        ck.atomic_save({"a": 1}, tmp_path / "state.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "hps.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "state.pt").stat().st_mode & 0o777 == 0o644
