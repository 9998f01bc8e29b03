"""Config parsing: every shipped config resolves, official values survive, bad keys are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from villa_fast.train.config import SCHEMA, ConfigError, infer_task, load_config, resolve_config, to_json

CONFIGS = sorted(
    p for p in (Path(__file__).parent.parent / "configs").glob("*.json") if not p.name.startswith("uniter")
)


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    for task in ("vqa-base-4gpu", "vqa-large-8gpu", "nlvr2-base-1gpu", "nlvr2-large-2gpu", "ve-base-2gpu"):
        assert f"train-{task}-adv.json" in names
    assert {"train-ve-large-4gpu-adv.json", "train-vcr-base-4gpu-adv.json", "train-vcr-large-4gpu-adv.json"} <= names
    assert any(n.startswith("pretrain") for n in names) and any(n.startswith("demo") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    cfg = resolve_config(path)
    assert cfg["task"] is not None
    again = resolve_config(None, json.loads(to_json(cfg)))
    assert again == cfg
    if cfg["adv_training"]:
        from villa_fast.adversarial import AdversarialConfig

        AdversarialConfig.from_villa_config(cfg)


def test_official_values_survive():
    from villa_fast.adversarial import AdversarialConfig

    root = Path(__file__).parent.parent / "configs"
    vqa = resolve_config(root / "train-vqa-base-4gpu-adv.json")
    assert vqa["task"] == "vqa"
    assert (vqa["train_batch_size"], vqa["gradient_accumulation_steps"], vqa["learning_rate"]) == (5120, 5, 8e-5)
    assert (vqa["lr_mul"], vqa["num_train_steps"], vqa["warmup_steps"]) == (10.0, 6000, 600)
    assert (vqa["adv_lr_txt"], vqa["adv_kl_weight"], vqa["adv_steps"]) == (1e-3, 1.5, 3)
    assert vqa["betas"] == [0.9, 0.98] and vqa["grad_norm"] == 2.0 and vqa["fp16"] is True
    assert AdversarialConfig.from_villa_config(vqa).modality == "text"
    vcr = resolve_config(root / "train-vcr-large-4gpu-adv.json")
    assert vcr["task"] == "vcr" and vcr["adv_lr_txt"] == 0.1 and vcr["max_txt_len"] == 220
    assert AdversarialConfig.from_villa_config(vcr).modality == "text+image"
    nlvr2 = resolve_config(root / "train-nlvr2-base-1gpu-adv.json")
    assert (nlvr2["model"], nlvr2["seed"], nlvr2["train_batch_size"]) == ("paired-attn", 77, 10240)
    pre = resolve_config(root / "pretrain-alldata-large-16gpu.json")
    assert pre["task"] == "pretrain" and pre["train_datasets"][0]["mix_ratio"] == [6, 8, 4, 4]


def test_task_from_file_name():
    assert infer_task("x/train-vqa-base-4gpu-adv.json") == "vqa"
    assert infer_task("train-itm-flickr-base-16gpu-hn.json") == "retrieval"
    assert infer_task("train-refcoco+-base-1gpu.json") == "re"
    assert infer_task("pretrain-indomain-base-8gpu.json") == "pretrain"
    assert infer_task("my.json") is None


def _write(tmp_path, obj) -> Path:
    p = tmp_path / "c.json"
    p.write_text(json.dumps(obj))
    return p


@pytest.mark.parametrize(
    "obj, words",
    [
        ({"learning_rte": 1e-4}, ["learning_rte", "learning_rate"]),
        ({"learning_rate": "fast"}, ["learning_rate", "number"]),
        ({"train_batch_size": 10.5}, ["train_batch_size", "integer"]),
        ({"fp16": "yes"}, ["fp16", "true or false"]),
        ({"optim": "sgd"}, ["optim", "adamw"]),
        ({"adv_modality": ["txt"]}, ["adv_modality"]),
        ({"adv_modality": ["text", "alter"]}, ["adv_modality", "alter"]),
        ({"betas": [0.9]}, ["betas"]),
        ({"gradient_accumulation_steps": 0}, ["gradient_accumulation_steps"]),
        ({"task": "captioning"}, ["task"]),
        ({"train_datasets": [{"db": [], "img": []}]}, ["train_datasets", "tasks"]),
        ({"train_datasets": [{"db": [], "img": [], "tasks": ["mlm"], "mix": [1]}]}, ["train_datasets", "mix"]),
        ({"mlm_prob": 1.5}, ["mlm_prob", "[0, 1]"]),
        ({"mrm_prob": -0.1}, ["mrm_prob", "probability"]),
        ({"itm_neg_prob": 2}, ["itm_neg_prob", "probability"]),
    ],
)
def test_bad_configs_name_the_key(tmp_path, obj, words):
    with pytest.raises(ConfigError) as exc:
        resolve_config(_write(tmp_path, obj))
    for w in words:
        assert w in str(exc.value)


def test_not_json_and_missing_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.json")


def test_precedence_defaults_json_flags(tmp_path):
    p = _write(tmp_path, {"task": "vqa", "learning_rate": 8e-5, "seed": 1})
    cfg = resolve_config(p, {"seed": 2})
    assert cfg["learning_rate"] == 8e-5 and cfg["seed"] == 2
    assert cfg["warmup_steps"] == SCHEMA["warmup_steps"].default


def test_demo_config_file_matches_the_demo():
    from villa_fast.train.demo import DEMO_CONFIG

    shipped = load_config(Path(__file__).parent.parent / "configs" / "demo-vqa-adv.json")
    for key, value in DEMO_CONFIG.items():
        if key != "adv_training":
            assert shipped[key] == value, key
    assert shipped["adv_training"] is True


@pytest.mark.parametrize(
    "key",
    ["seed", "grad_norm", "lr_mul", "valid_steps", "log_steps", "num_train_steps", "adv_steps", "fp16"]
    + ["keep_checkpoints", "learning_rate", "dropout", "train_batch_size", "betas", "adv_modality"],
)
def test_null_is_refused_where_a_key_needs_a_value(tmp_path, key):
    with pytest.raises(ConfigError) as exc:
        resolve_config(_write(tmp_path, {"task": "vqa", key: None}))
    msg = str(exc.value)
    assert repr(key) in msg and "null" in msg and "default" in msg
    with pytest.raises(ConfigError, match=key):
        resolve_config(None, {"task": "vqa", key: None})


@pytest.mark.parametrize("key", ["save_steps", "attack_lr", "checkpoint", "adv_kl_reduction", "output_dir", "task"])
def test_null_is_accepted_where_it_means_unset(tmp_path, key):
    cfg = resolve_config(_write(tmp_path, {key: None}))
    assert cfg[key] is None


# -- non-finite numbers, ranges, unreadable files ------------------------------------------------------------


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("key", ["learning_rate", "adv_lr_txt", "attack_eps", "dropout"])
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, key, text):
    p = tmp_path / "c.json"
    p.write_text(f'{{"task": "vqa", "{key}": {text}}}')  # Python's json reads NaN / Infinity
    with pytest.raises(ConfigError, match=rf"'{key}' must be a finite number"):
        resolve_config(p)
    with pytest.raises(ConfigError, match=rf"'{key}' must be a finite number"):
        resolve_config(None, {"task": "vqa", key: float(text.replace("Infinity", "inf"))})


def test_non_finite_betas_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="'betas' must be a list of finite numbers"):
        resolve_config(None, {"task": "vqa", "betas": [float("nan"), 0.98]})


@pytest.mark.parametrize(
    "obj, words",
    [
        ({"adv_lr_txt": -1e-3}, ["adv_lr_txt", ">= 0"]),
        ({"adv_lr_img": -0.5}, ["adv_lr_img", ">= 0"]),
        ({"attack_eps": -1.0}, ["attack_eps", ">= 0"]),
        ({"attack_lr": -0.1}, ["attack_lr", ">= 0"]),
        ({"lr_mul": 0}, ["lr_mul", "> 0"]),
        ({"lr_mul": -10.0}, ["lr_mul", "> 0"]),
        ({"keep_checkpoints": -1}, ["keep_checkpoints", ">= 0"]),
        ({"hard_neg_size": -1}, ["hard_neg_size", ">= 0"]),
        ({"negative_size": 0}, ["negative_size", "> 0"]),
        ({"negative_size": 3, "hard_neg_size": 4}, ["hard_neg_size", "negative_size", "larger"]),
        ({"inf_minibatch_size": 0}, ["inf_minibatch_size"]),
        ({"max_val_examples": -5}, ["max_val_examples"]),
    ],
)
def test_out_of_range_values_name_the_key(tmp_path, obj, words):
    with pytest.raises(ConfigError) as exc:
        resolve_config(_write(tmp_path, {"task": "retrieval", **obj}))
    for w in words:
        assert w in str(exc.value)


def test_zero_means_off_where_documented():
    cfg = resolve_config(None, {"task": "retrieval", "keep_checkpoints": 0, "hard_neg_size": 0, "adv_lr_img": 0})
    assert cfg["keep_checkpoints"] == 0 and cfg["hard_neg_size"] == 0


def _pretrain_entry(**kw):
    return {"name": "coco", "db": ["/d/txt"], "img": ["/d/img"], "tasks": ["mlm", "itm"], **kw}


def test_all_zero_mix_ratio_is_refused_naming_the_entry(tmp_path):
    entries = [_pretrain_entry(mix_ratio=[1, 2]), _pretrain_entry(name="vg", mix_ratio=[0, 0])]
    with pytest.raises(ConfigError, match=r"'train_datasets'\[1\] \('vg'\): mix_ratio is all zeros"):
        resolve_config(_write(tmp_path, {"task": "pretrain", "train_datasets": entries}))
    with pytest.raises(ConfigError, match=r"'train_datasets'\[0\]: mix_ratio must be finite numbers >= 0"):
        resolve_config(None, {"task": "pretrain", "train_datasets": [_pretrain_entry(mix_ratio=[-1, 2])]})
    with pytest.raises(ConfigError, match=r"'train_datasets'\[0\]: mix_ratio must be a list of numbers"):
        resolve_config(None, {"task": "pretrain", "train_datasets": [_pretrain_entry(mix_ratio="1,2")]})
    # one task of an entry at 0 is a valid mix
    cfg = resolve_config(None, {"task": "pretrain", "train_datasets": [_pretrain_entry(mix_ratio=[0, 3])]})
    assert cfg["train_datasets"][0]["mix_ratio"] == [0, 3]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"db": "/d/txt"}, "'db' must be a non-empty list of strings, got '/d/txt'"),  # list("/d/txt"): one db a char
        ({"img": []}, "'img' must be a non-empty list of strings"),
        ({"tasks": "mlm"}, "'tasks' must be a non-empty list of strings"),
        ({"tasks": ["mlm", 3]}, "'tasks' must be a non-empty list of strings"),
        ({"tasks": ["mlm", "mrm"]}, "unknown pre-training tasks ['mrm']"),
    ],
)
def test_pretrain_dataset_entries_are_checked_before_any_loader_reads_them(change, words):
    with pytest.raises(ConfigError) as exc:
        resolve_config(None, {"task": "pretrain", "val_datasets": [_pretrain_entry(**change)]})
    assert "'val_datasets'[0]: " + words in str(exc.value)
    # the authors' spellings of a task are accepted, here and in adv_pretrain_tasks
    cfg = resolve_config(
        None,
        {
            "task": "pretrain",
            "train_datasets": [_pretrain_entry(tasks=["mrc-kl", "mlm"])],
            "adv_pretrain_tasks": ["mlm"],
        },
    )
    assert cfg["train_datasets"][0]["tasks"] == ["mrc-kl", "mlm"]
    with pytest.raises(ConfigError, match="adv_pretrain_tasks"):
        resolve_config(None, {"task": "pretrain", "adv_pretrain_tasks": ["mlm", "mrm"]})


def test_config_that_is_a_directory_or_not_utf8_gives_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        resolve_config(tmp_path)
    p = tmp_path / "latin1.json"
    p.write_bytes('{"task": "vqa", "output_dir": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.json: not a UTF-8 text file"):
        load_config(p)


def test_lr_mul_defaults_to_the_authors_per_task_value():
    # train_vqa_adv.py and train_vcr_adv.py default the head's multiplier to 10; the others have none
    for task, want in (("vqa", 10.0), ("vcr", 10.0), ("nlvr2", 1.0), ("ve", 1.0), ("retrieval", 1.0), ("re", 1.0)):
        assert resolve_config(None, {"task": task})["lr_mul"] == want, task
    # a value any source sets wins, the released VCR configs' 1.0 included
    assert resolve_config(None, {"task": "vcr", "lr_mul": 1.0})["lr_mul"] == 1.0
    assert resolve_config(None, {"task": "vqa"}, base={"lr_mul": 2.0})["lr_mul"] == 2.0
    vcr_config = next(p for p in CONFIGS if p.name == "train-vcr-base-4gpu-adv.json")
    assert resolve_config(vcr_config)["lr_mul"] == 1.0


def test_pretrain_configs_name_the_authors_text_databases():
    # the names of UNITER's download scripts and pre-training configs (CC and SBU were never released as dbs)
    official = {
        "pretrain_coco_train.db",
        "pretrain_coco_restval.db",
        "pretrain_coco_val.db",
        "pretrain_vg_train.db",
        "pretrain_vg_val.db",
        "conceptual_caption_train.db",
        "sbu_caption_train.db",
        "vcr_train.db",
        "vcr_val.db",
    }
    for path in CONFIGS:
        if path.name.startswith("pretrain"):
            cfg = resolve_config(path)
            for entry in [*cfg["train_datasets"], *(cfg["val_datasets"] or [])]:
                for db in entry["db"]:
                    assert Path(db).name in official, (path.name, db)
