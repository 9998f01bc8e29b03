"""A task refuses, naming the database, data its model cannot embed (before a GPU meets an out-of-range index)."""

from __future__ import annotations

import json

import pytest

from tests.test_train_fixtures import task_config
from villa_fast.data.db import CONVERTER_MARK
from villa_fast.tasks import DataContext, build_task
from villa_fast.train.config import ConfigError, resolve_config


def _task(tmp_path, task="vqa", **model_changes):
    cfg = task_config(tmp_path, task)
    mc = json.loads(open(cfg["model_config"]).read())
    mc.update(model_changes)
    path = tmp_path / "model_changed.json"
    path.write_text(json.dumps(mc))
    cfg["model_config"] = str(path)
    return build_task(resolve_config(None, cfg)), mc


def test_data_that_fits_loads(tmp_path):
    task, mc = _task(tmp_path)
    train = next(iter(task.train_loader(DataContext(seed=0))))
    val = next(iter(task.eval_loader(DataContext(seed=0))))
    for batch in (train, val):
        assert int(batch["input_ids"].max()) < mc["vocab_size"]
        assert batch["img_feat"].shape[-1] == mc["img_dim"]
        assert batch["input_ids"].shape[1] <= mc["max_position_embeddings"]


def test_token_ids_past_the_vocabulary_are_refused(tmp_path):
    task, mc = _task(tmp_path / "a")
    ds_meta = json.loads(open(task.cfg["train_txt_db"] + "/meta.json").read())
    small = ds_meta["v_range"][1] - 1
    task, _ = _task(tmp_path / "b", vocab_size=small)
    with pytest.raises(ConfigError, match=rf"token ids reach .* the model embeds {small} words"):
        task.train_loader(DataContext(seed=0))


def test_vcr_counts_its_person_tags_in_the_vocabulary(tmp_path):
    task, _ = _task(tmp_path, "vcr")
    assert task.model_vocab_size(task.model_config()) == task.model_config()["vocab_size"] + 81
    task.train_loader(DataContext(seed=0))


def test_rows_past_the_position_embeddings_are_refused(tmp_path):
    # evaluation reads every text (max_txt_len -1): a row longer than the positions is named with its db
    task, _ = _task(tmp_path, max_position_embeddings=6)
    with pytest.raises(ConfigError, match=r"makes a row of \d+ tokens .* past the model's 6 position embeddings"):
        task.eval_loader(DataContext(seed=0))


def test_region_features_of_another_width_are_refused(tmp_path):
    task, mc = _task(tmp_path / "a")
    task, _ = _task(tmp_path / "b", img_dim=mc["img_dim"] + 1)
    with pytest.raises(ConfigError, match=rf"region features are {mc['img_dim']} wide .* img_dim {mc['img_dim'] + 1}"):
        task.train_loader(DataContext(seed=0))


def test_retrieval_loaders_are_checked_too(tmp_path):
    """Retrieval's evaluation (its own item loader) and hard-negative training (its own sampler) check as well."""
    task, mc = _task(tmp_path / "a", "retrieval")
    task, _ = _task(tmp_path / "b", "retrieval", img_dim=mc["img_dim"] + 1)
    with pytest.raises(ConfigError, match="region features are"):
        task.eval_loader(DataContext(seed=0))
    task.cfg = {**task.cfg, "hard_neg_size": 1, "negative_size": 2}
    with pytest.raises(ConfigError, match="region features are"):
        task.train_loader(DataContext(seed=0))


def test_a_txt_db_built_for_another_task_is_refused(tmp_path):
    """The converter records the task in meta.json: a VE db under a VQA config (or the reverse) is named."""
    task, _ = _task(tmp_path)
    meta_path = task.pairs("train")[0][0] + "/meta.json"
    meta = {**json.loads(open(meta_path).read()), **CONVERTER_MARK}  # as the converter writes it
    with open(meta_path, "w") as fh:
        json.dump({**meta, "task": "ve"}, fh)
    with pytest.raises(ConfigError, match=r"built for task 've' \(meta.json\) cannot train or evaluate task vqa"):
        task.train_loader(DataContext(seed=0))
    with open(meta_path, "w") as fh:
        json.dump({**meta, "task": "vqa"}, fh)
    task.train_loader(DataContext(seed=0))  # its own task's db
