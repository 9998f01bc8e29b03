"""Malformed text records: every read checks the fields the datasets use, and a bad record stops with a
:class:`DataFormatError` naming the database, the key and what is wrong (also from a loader's worker)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.test_data_helpers import IMG_ARGS, META, make_images
from villa_fast.data import (
    DataFormatError,
    DetectFeatLmdb,
    MlmDataset,
    Nlvr2PairedDataset,
    TxtDbWriter,
    TxtTokLmdb,
    VqaDataset,
    build_dataloader,
    vqa_collate,
)
from villa_fast.data.db import TxtLmdb

NAMES = [f"img{k:03d}.npz" for k in range(4)]
GOOD = {"input_ids": [104, 105], "img_fname": NAMES[0], "target": {"labels": [1], "scores": [1.0]}}


@pytest.fixture(scope="module")
def img(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    make_images(root / "img", n=4)
    return DetectFeatLmdb(root / "img", **IMG_ARGS)


def _txt_db(path, record: dict) -> TxtTokLmdb:
    """A one-record txt_db (key 'x0') holding ``record`` as stored, whatever its fields."""
    with TxtDbWriter(path, dict(META)) as w:
        w.add("x0", dict(GOOD), txt_len=2)
    db = TxtLmdb(path, readonly=False)
    db["x0"] = record
    db.close()
    return TxtTokLmdb(path, -1)


BAD = {
    "no input_ids": (
        {"img_fname": NAMES[0], "target": {"labels": [1], "scores": [1.0]}},
        "no 'input_ids' (the record holds ['img_fname', 'target'])",
    ),
    "input_ids a str": (dict(GOOD, input_ids="hello"), "'input_ids' is a str, not a list of token ids"),
    "input_ids with a str": (dict(GOOD, input_ids=[104, "x"]), "'input_ids' is a list whose entry 1 is 'x'"),
    "input_ids a float array": (dict(GOOD, input_ids=np.ones(3)), "'input_ids' is a numpy array of dtype float64"),
    "scores shorter than labels": (
        dict(GOOD, target={"labels": [1, 2], "scores": [1.0]}),
        "target has 2 labels but 1 scores",
    ),
    "labels without scores": (dict(GOOD, target={"labels": [1, 2]}), "target has 2 labels but 0 scores"),
    "labels a str": (dict(GOOD, target={"labels": "1", "scores": [1.0]}), "target 'labels' is a str, not a list"),
    "target a list": (dict(GOOD, target=[1, 2]), "'target' is a list: expected a map of labels and scores"),
    "target a str": (dict(GOOD, target="yes"), "'target' is a str"),
    "VCR answers not lists": (dict(GOOD, input_ids_as=[[104], 5]), "'input_ids_as' candidate 1 is a int"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_record_names_db_key_and_field(tmp_path, img, case):
    record, what = BAD[case]
    txt = _txt_db(tmp_path / "txt", record)
    where = f"{tmp_path / 'txt'} key 'x0': "
    for ds in (VqaDataset(10, txt, img), MlmDataset(txt, img)):
        with pytest.raises(DataFormatError, match=re.escape(where + what)):
            ds[0]
    with pytest.raises(DataFormatError, match=re.escape(where + what)):
        txt["x0"]


def test_vqa_needs_a_map_target(tmp_path, img):
    """An integer target is an NLVR2 label: valid in a txt_db, not for VQA's soft targets."""
    txt = _txt_db(tmp_path / "txt", dict(GOOD, target=1))
    assert txt["x0"]["target"] == 1
    with pytest.raises(
        DataFormatError, match=re.escape(f"{tmp_path / 'txt'} key 'x0': 'target' is a int, not the map")
    ):
        VqaDataset(10, txt, img)[0]


def test_the_error_reaches_the_caller_from_a_worker(tmp_path, img):
    txt = _txt_db(tmp_path / "txt", dict(GOOD, target={"labels": [1, 2], "scores": [1.0]}))
    loader = build_dataloader(
        VqaDataset(10, txt, img), vqa_collate, batch_size_tokens=400, is_train=False, num_workers=1
    )
    with pytest.raises(DataFormatError, match=re.escape(f"{tmp_path / 'txt'} key 'x0': target has 2 labels but 1")):
        next(iter(loader))


@pytest.mark.parametrize(
    "record",
    [
        dict(GOOD),
        dict(GOOD, target={"labels": [], "scores": []}),
        dict(GOOD, target={}),
        dict(GOOD, target={"labels": np.array([1, 2]), "scores": np.array([0.5, 1.0], np.float32)}),
        dict(GOOD, target=0),
        dict(GOOD, target=True),
        dict(GOOD, target=None),
        dict(GOOD, input_ids=np.array([104, 105], np.int64)),
        dict(GOOD, input_ids=[]),
        {"input_ids": [104], "input_ids_as": [[104], [105, 106]], "input_ids_rs": [], "qa_target": 1},
        {k: v for k, v in GOOD.items() if k != "target"},
    ],
)
def test_well_formed_records_pass(record):
    from villa_fast.data.db import check_txt_record

    assert check_txt_record(record, "db key 'x'") is record


@pytest.mark.parametrize(("target", "error"), [(1, None), (None, "no 'target'"), ({"labels": []}, "a map 'target'")])
def test_nlvr2_labels(tmp_path, img, target, error):
    rec = {"input_ids": [104, 105], "img_fname": [NAMES[0], NAMES[1]], "target": target}
    txt = _txt_db(tmp_path / "txt", rec)
    txt._txt2img = {"x0": [NAMES[0], NAMES[1]]}
    ds = Nlvr2PairedDataset(txt, img)
    if error is None:
        assert ds[0][1] == 1
    else:
        with pytest.raises(DataFormatError, match=re.escape(f"{tmp_path / 'txt'} key 'x0': {error}, not the 0 / 1")):
            ds[0]
