"""What the trainer refuses or warns about before it trains: a used output directory for a new run, a resume
whose training settings differ from the checkpoint's, initial weights that do not fit the model; and a resume
that loads its training state on the CPU whatever the training device."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_train_fixtures import task_config
from villa_fast.train.config import ConfigError, resolve_config
from villa_fast.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


_BASE: dict[str, dict] = {}


def _cfg(tmp_path, **changes) -> dict:
    """The tiny VQA run under ``tmp_path`` (its data built once), with ``changes``."""
    if str(tmp_path) not in _BASE:
        base = task_config(tmp_path, "vqa", num_train_steps=2, valid_steps=2, keep_checkpoints=0)
        for key in ("val_txt_db", "val_img_db"):
            base.pop(key)
        _BASE[str(tmp_path)] = base
    return resolve_config(None, {**_BASE[str(tmp_path)], **changes})


def _history(tmp_path) -> str:
    return (tmp_path / "out" / "log" / "history.jsonl").read_text()


# -- resume on an accelerator -------------------------------------------------------------------------
def test_resume_loads_the_training_state_on_the_cpu(tmp_path):
    cfg = _cfg(tmp_path)
    Trainer(cfg, quiet=True).train()
    path = tmp_path / "out" / "ckpt" / "step_2"
    saved = torch.load(path / "train_state.pt", weights_only=True)["rng"][0]
    trainer = Trainer(cfg, resume=True, quiet=True)
    # a device whose tensors the CPU random-state setters cannot take, as CUDA's: meta stands in for it
    trainer.device = torch.device("meta")
    torch.manual_seed(123)
    trainer.load(path)
    assert trainer.global_step == 2
    assert torch.equal(torch.get_rng_state(), saved["torch"])


# -- a new run in a used output directory ------------------------------------------------------------
def test_a_new_run_refuses_an_output_dir_holding_another_run(tmp_path):
    Trainer(_cfg(tmp_path), quiet=True).train()
    before = sorted(p.name for p in (tmp_path / "out" / "ckpt").iterdir())
    history = _history(tmp_path)
    with pytest.raises(ConfigError) as exc:
        Trainer(_cfg(tmp_path, seed=8), quiet=True).train()
    msg = str(exc.value)
    assert str(tmp_path / "out") in msg and "--resume" in msg and "another" in msg and "step_2" in msg
    # the old run is left as it was
    assert sorted(p.name for p in (tmp_path / "out" / "ckpt").iterdir()) == before
    assert _history(tmp_path) == history
    # resuming it is allowed
    resumed = Trainer(_cfg(tmp_path), resume=True, quiet=True)
    resumed.train()
    assert resumed.global_step == 2


def test_a_resume_without_a_checkpoint_starts_a_fresh_history(tmp_path):
    log = tmp_path / "out" / "log"
    log.mkdir(parents=True)
    (log / "history.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    with pytest.raises(ConfigError, match="history.jsonl"):
        Trainer(_cfg(tmp_path), quiet=True).train()
    Trainer(_cfg(tmp_path), resume=True, quiet=True).train()
    steps = [json.loads(x)["step"] for x in _history(tmp_path).splitlines()]
    assert steps == [1, 2] and "9.0" not in _history(tmp_path)


def test_a_new_run_may_use_a_directory_without_checkpoints_or_history(tmp_path):
    (tmp_path / "out" / "log").mkdir(parents=True)
    (tmp_path / "out" / "log" / "hps.json").write_text("{}")
    (tmp_path / "out" / "notes.txt").write_text("kept")
    assert Trainer(_cfg(tmp_path), quiet=True).train()


# -- a resume whose settings differ from the checkpoint's ----------------------------------------------
def test_resume_refuses_changed_training_settings(tmp_path):
    Trainer(_cfg(tmp_path), quiet=True).train()
    with pytest.raises(ConfigError) as exc:
        Trainer(_cfg(tmp_path, learning_rate=5e-4, seed=8, log_steps=2), resume=True, quiet=True).train()
    msg = str(exc.value)
    assert "learning_rate" in msg and "0.001" in msg and "0.0005" in msg
    assert "seed" in msg and "7" in msg and "8" in msg
    assert "log_steps" not in msg


def test_resume_allows_bookkeeping_changes(tmp_path):
    Trainer(_cfg(tmp_path), quiet=True).train()
    changes = {"log_steps": 5, "valid_steps": 7, "save_steps": 3, "keep_checkpoints": 1, "n_workers": 1}
    trainer = Trainer(_cfg(tmp_path, **changes), resume=True, quiet=True)
    trainer.train()
    assert trainer.global_step == 2


def test_resume_without_a_saved_config_skips_the_comparison(tmp_path):
    Trainer(_cfg(tmp_path), quiet=True).train()
    path = tmp_path / "out" / "ckpt" / "step_2" / "train_state.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]
    torch.save(state, path)
    (path.parent / "checksums.json").unlink()  # a checkpoint written before either was saved
    trainer = Trainer(_cfg(tmp_path, learning_rate=5e-4), resume=True, quiet=True)
    trainer.train()
    assert trainer.global_step == 2


# -- initial weights -----------------------------------------------------------------------------------
def test_initial_weights_that_fit_nothing_are_refused(tmp_path):
    ckpt = tmp_path / "other.safetensors"
    save_file({"encoder.some.other.model.weight": torch.zeros(3)}, str(ckpt))
    with pytest.raises(ConfigError) as exc:
        Trainer(_cfg(tmp_path, checkpoint=str(ckpt)), quiet=True)
    msg = str(exc.value)
    assert str(ckpt) in msg and "encoder.some.other.model.weight" in msg and "uniter.embeddings" in msg


def test_missing_encoder_weights_are_a_warning_a_fresh_head_is_not(tmp_path, caplog):
    donor = Trainer(_cfg(tmp_path), quiet=True)
    donor_path = tmp_path / "donor.safetensors"
    from villa_fast.models import save_safetensors

    save_safetensors(donor.model, donor_path)
    sd = load_file(str(donor_path))
    gone = ["uniter.pooler.dense.weight", "uniter.pooler.dense.bias"]
    sd = {k: v for k, v in sd.items() if k not in gone and not k.startswith("vqa_output.")}
    ckpt = tmp_path / "pretrained.safetensors"
    save_file(sd, str(ckpt))
    with caplog.at_level(logging.INFO, logger="villa_fast.train"):
        Trainer(_cfg(tmp_path, checkpoint=str(ckpt)), quiet=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 " in warnings[0] and all(k in warnings[0] for k in gone) and "vqa_output" not in warnings[0]
    # the fresh task head is reported at INFO level
    assert any("vqa_output" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_complete_initial_weights_log_no_warning(tmp_path, caplog):
    donor = Trainer(_cfg(tmp_path), quiet=True)
    from villa_fast.models import save_safetensors

    save_safetensors(donor.model, tmp_path / "full.safetensors")
    with caplog.at_level(logging.INFO, logger="villa_fast.train"):
        Trainer(_cfg(tmp_path, checkpoint=str(tmp_path / "full.safetensors")), quiet=True)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_resume_compares_the_model_not_the_model_config_path(tmp_path):
    Trainer(_cfg(tmp_path), quiet=True).train()
    model = json.loads(open(_cfg(tmp_path)["model_config"]).read())
    (tmp_path / "moved.json").write_text(json.dumps(model))
    trainer = Trainer(_cfg(tmp_path, model_config=str(tmp_path / "moved.json")), resume=True, quiet=True)
    trainer.train()
    assert trainer.global_step == 2
    (tmp_path / "changed.json").write_text(json.dumps({**model, "layer_norm_eps": 1e-6}))
    with pytest.raises(ConfigError, match="model_config.*layer_norm_eps"):
        Trainer(_cfg(tmp_path, model_config=str(tmp_path / "changed.json")), resume=True, quiet=True).train()


def test_resume_compares_adv_max_graphs_only_under_adv_graphed():
    from villa_fast.train.config import resume_differences

    saved = {"task": "vqa", "adv_graphed": True, "adv_max_graphs": 16}
    # under adv_graphed it sets a token-counted task's padded shapes (so the batches): a change is refused
    now = {"task": "vqa", "adv_graphed": True, "adv_max_graphs": 9}
    assert resume_differences(saved, now) == [("adv_max_graphs", 16, 9)]
    eager = {"task": "vqa", "adv_graphed": False, "adv_max_graphs": 16}
    assert resume_differences(eager, {**eager, "adv_max_graphs": 9}) == []
    # an example-counted task's batches do not depend on it: only the cap on captured graphs changes
    re_saved = {"task": "re", "adv_graphed": True, "adv_max_graphs": 16}
    assert resume_differences(re_saved, {**re_saved, "adv_max_graphs": 9}) == []


def test_resume_with_the_data_moved_warns_and_continues(tmp_path, caplog):
    import shutil

    Trainer(_cfg(tmp_path), quiet=True).train()
    old = _cfg(tmp_path)["train_txt_db"]
    new = str(tmp_path / "moved_txt")
    shutil.copytree(old, new)
    with caplog.at_level(logging.WARNING, logger="villa_fast.train"):
        trainer = Trainer(_cfg(tmp_path, train_txt_db=new), resume=True, quiet=True)
        trainer.train()
    assert trainer.global_step == 2
    msg = " ".join(r.getMessage() for r in caplog.records if "training data elsewhere" in r.getMessage())
    assert "train_txt_db:" in msg and old in msg and new in msg


def test_resume_data_moves_names_pretraining_datasets():
    from villa_fast.train.config import resume_data_moves

    saved = {"train_datasets": [{"name": "coco", "db": ["/a/txt"], "img": ["/a/img"], "tasks": ["mlm"]}]}
    now = {"train_datasets": [{"name": "coco", "db": ["/b/txt"], "img": ["/a/img"], "tasks": ["mlm"]}]}
    assert resume_data_moves(saved, now) == [("train_datasets[0].db", ["/a/txt"], ["/b/txt"])]
    assert resume_data_moves(saved, saved) == []


def test_one_named_gpu_for_several_processes_is_refused():
    from villa_fast.train.config import ConfigError
    from villa_fast.train.trainer import resolve_device

    assert resolve_device("cuda", local_rank=3, world_size=4) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", world_size=1) == torch.device("cuda", 1)
    assert resolve_device("cpu", local_rank=2, world_size=4) == torch.device("cpu")
    with pytest.raises(ConfigError, match="names one GPU for all 4 processes"):
        resolve_device("cuda:0", local_rank=2, world_size=4)


def test_a_resumed_run_purges_tensorboard_events_past_its_checkpoint(tmp_path, monkeypatch, caplog):
    """The killed run logged steps after its last checkpoint; the resumed run logs them again: its writer drops
    the old events from the step after the checkpoint on (``purge_step``, fixed at the resume even though the
    writer opens at the first log entry, later), a fresh run's purges nothing, a resume without a checkpoint
    everything."""
    pytest.importorskip("torch.utils.tensorboard")
    import torch.utils.tensorboard as tbmod

    made = []

    class Writer:
        def __init__(self, log_dir, **kw):
            made.append(kw)

        def add_scalar(self, *a, **kw):
            pass

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tbmod, "SummaryWriter", Writer)
    cfg = _cfg(tmp_path, tensorboard=True, num_train_steps=4, save_steps=2, valid_steps=4, log_steps=2)
    Trainer(cfg, quiet=True).train()
    shutil.rmtree(tmp_path / "out" / "ckpt" / "step_4")  # killed after logging step 4, before its checkpoint
    Trainer(cfg, resume=True, quiet=True).train()
    with caplog.at_level(logging.WARNING, logger="villa_fast.train"):
        Trainer(_cfg(tmp_path, tensorboard=True, output_dir=str(tmp_path / "empty")), resume=True, quiet=True).train()
    assert made == [{}, {"purge_step": 3}, {"purge_step": 1}]
    assert "no checkpoint in" in caplog.text


def test_a_wrong_validation_path_stops_the_run_before_it_writes_or_trains(tmp_path):
    cfg = _cfg(tmp_path, val_txt_db=str(tmp_path / "no_such_db"), val_img_db=str(tmp_path / "data" / "img"))
    trainer = Trainer(cfg, quiet=True)
    steps = []
    real = trainer.micro_step
    trainer.micro_step = lambda batch: (steps.append(1), real(batch))[1]
    with pytest.raises(FileNotFoundError, match="no_such_db"):
        trainer.train()
    assert not steps and not (tmp_path / "out" / "log" / "history.jsonl").exists()
    # opening the data first leaves every random stream as it was
    import random

    import numpy as np

    trainer = Trainer(_cfg(tmp_path, output_dir=str(tmp_path / "out2")), quiet=True)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    trainer._open_data()
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()


def test_a_resume_does_not_need_the_initial_weights_file_any_more(tmp_path):
    """Every weight of a resumed run comes from its training checkpoint: the initial ``checkpoint`` file may have
    moved; without a training checkpoint it is read as at the start."""
    from villa_fast.models import save_safetensors

    donor = Trainer(_cfg(tmp_path), quiet=True)
    init = tmp_path / "init.safetensors"
    save_safetensors(donor.model, init)
    cfg = _cfg(tmp_path, checkpoint=str(init), num_train_steps=4, save_steps=2, valid_steps=4)
    Trainer(cfg, quiet=True).train()
    shutil.rmtree(tmp_path / "out" / "ckpt" / "step_4")
    init.rename(tmp_path / "moved.safetensors")
    resumed = Trainer(cfg, resume=True, quiet=True)
    resumed.train()
    assert resumed.global_step == 4
    with pytest.raises(FileNotFoundError, match="init.safetensors"):
        Trainer(_cfg(tmp_path, checkpoint=str(init), output_dir=str(tmp_path / "fresh")), resume=True, quiet=True)
