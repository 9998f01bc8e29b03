"""What the authors' scripts write and what a damaged database holds: read as the authors' readers read it, or
refused with one line naming the file, the key and the field.

* meta.json: the authors' ``prepro.py`` writes its options, ``"task": "nlvr"`` for NLVR2; only a db our converter
  marked is held to its ``task``;
* compressed image records written under numpy < 2.1 hold a 0-d ``allow_pickle`` member;
* regions are kept in the detector's order, the first ``nbb`` rows (ground-truth boxes stay in annotation order);
* a truncated ``data.mdb``, non-finite or non-float region arrays, a record of another feature width, token ids
  outside the vocabulary, a record longer than its ``id2len`` entry and malformed side files are refused;
* numpy scalars in text records (msgpack-numpy's encoding) are read as ints and floats.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import lmdb
import numpy as np
import pytest

from tests.test_data_helpers import IMG_ARGS, META, D, make_images, make_txt
from villa_fast.data import (
    DataFormatError,
    DetectFeatLmdb,
    ImgDbWriter,
    TxtDbWriter,
    TxtTokLmdb,
    VcrTxtTokLmdb,
    VqaDataset,
    vqa_collate,
)
from villa_fast.data.codec import encode_img_record, npz_bytes
from villa_fast.data.convert import convert_images, convert_texts
from villa_fast.data.db import CONVERTER_MARK, VCR_PERSON_TAGS, check_txt_record, img_db_name

ROOT = Path(__file__).resolve().parents[1]
NBB_FILE = "nbb_th0.2_max8_min3.json"


def _arrays(n: int = 6, width: int = D, seed: int = 0) -> dict[str, np.ndarray]:
    """A detection of ``n`` regions whose features' first column is the region's index."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 0.5, (n, 2))
    wh = rng.uniform(0.1, 0.4, (n, 2))
    feat = rng.normal(size=(n, width)).astype(np.float32)
    feat[:, 0] = np.arange(n)
    return {
        "features": feat,
        "norm_bb": np.concatenate([xy, xy + wh, wh], 1).astype(np.float32),
        "conf": np.linspace(0.9, 0.3, n).astype(np.float32),
    }


def _img_db(root: Path, names=("i0.npz", "i1.npz", "i2.npz"), compress: bool = True) -> Path:
    """A valid img_db (its nbb file and keys) whose records the tests then replace with :func:`_put`."""
    with ImgDbWriter(root, compress=compress, **IMG_ARGS) as w:
        for k, name in enumerate(names):
            w.add(name, **_arrays(seed=k))
    return root / img_db_name(0.2, 8, 3, 8, compress)


def _put(db_path: Path, key: str, raw: bytes) -> None:
    """Write raw record bytes, as a foreign tool would."""
    env = lmdb.open(str(db_path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(key.encode(), raw)
    env.close()


def _savez_compressed(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes ``np.savez_compressed`` writes for these members, 0-d arrays kept 0-d (``npz_bytes`` makes them
    1-d), whatever keyword names the installed numpy reserves."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def _f16(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the authors' conversion stores: float32 arrays as float16."""
    return {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in arrays.items()}


# ----------------------------------------------------------------------------- 1. meta.json "task"


def _task_with_meta(tmp_path, task_name: str, meta_changes: dict):
    from tests.test_train_fixtures import task_config
    from villa_fast.tasks import build_task
    from villa_fast.train.config import resolve_config

    cfg = task_config(tmp_path, task_name)
    for key in ("train_txt_db", "val_txt_db"):
        path = Path(cfg[key], "meta.json")
        path.write_text(json.dumps({**json.loads(path.read_text()), **meta_changes}))
    return build_task(resolve_config(None, cfg))


def test_official_nlvr2_meta_task_is_not_checked(tmp_path):
    """The authors' prepro.py writes meta.json = its options: "task": "nlvr" for NLVR2 (no mark of ours)."""
    from villa_fast.tasks import DataContext

    task = _task_with_meta(tmp_path, "nlvr2", {"task": "nlvr", "annotations": ["a.jsonl"], "toker": "bert-base-cased"})
    batch = next(iter(task.train_loader(DataContext(seed=0))))
    assert batch["input_ids"].shape[0] > 0
    next(iter(task.eval_loader(DataContext(seed=0))))


def test_a_converted_db_is_marked_and_held_to_its_task(tmp_path):
    from tests.test_train_fixtures import META as FIX_META
    from tests.test_train_fixtures import task_config
    from villa_fast.tasks import DataContext, build_task
    from villa_fast.train.config import ConfigError, resolve_config

    cfg = task_config(tmp_path / "data", "vqa")
    cfg["ans2label"] = str(Path(cfg["train_txt_db"], "ans2label.json"))
    lines = [
        {"id": f"e{k}", "input_ids": [5, 6, 7], "img_fname": f"img_{k:03d}.npz", "label": "entailment"}
        for k in range(4)
    ]
    (tmp_path / "ve.jsonl").write_text("\n".join(map(json.dumps, lines)))
    convert_texts("ve", tmp_path / "ve.jsonl", tmp_path / "ve_txt", meta=FIX_META)
    meta = json.loads((tmp_path / "ve_txt" / "meta.json").read_text())
    assert meta["task"] == "ve" and all(meta[k] == v for k, v in CONVERTER_MARK.items())
    task = build_task(resolve_config(None, {**cfg, "train_txt_db": str(tmp_path / "ve_txt")}))
    with pytest.raises(ConfigError, match=r"ve_txt: a txt_db built for task 've' .* cannot train or evaluate task vqa"):
        task.train_loader(DataContext(seed=0))


# ----------------------------------------------------------------------------- 2. the stray allow_pickle member


def test_compressed_records_with_the_authors_allow_pickle_member_load(tmp_path):
    db_path = _img_db(tmp_path / "img")
    arrays = _f16(_arrays(seed=5))
    # what np.savez_compressed(f, **dump, allow_pickle=True) wrote before numpy 2.1: one more member
    _put(db_path, "i0.npz", _savez_compressed({**arrays, "allow_pickle": np.array(True)}))
    # a member of that name holding data is no such leftover
    _put(db_path, "i1.npz", _savez_compressed({**arrays, "allow_pickle": np.ones(6, bool)}))
    db = DetectFeatLmdb(tmp_path / "img", **IMG_ARGS)
    assert db.img_dim == D
    feat, bb = db["i0.npz"]
    nbb = db.name2nbb["i0.npz"]
    np.testing.assert_array_equal(feat.numpy(), arrays["features"][:nbb])
    np.testing.assert_array_equal(bb.numpy(), arrays["norm_bb"][:nbb].astype(np.float32))
    dump = db.get_dump("i0.npz")
    assert set(dump) == {"features", "norm_bb", "conf"}
    with pytest.raises(DataFormatError, match=r"key 'i1.npz': unknown keys \['allow_pickle'\]"):
        db["i1.npz"]


def test_get_dump_keeps_0d_members_whole(tmp_path):
    db_path = _img_db(tmp_path / "img", compress=False)
    arrays = _f16(_arrays(seed=5))
    _put(db_path, "i0.npz", encode_img_record({**arrays, "image_w": np.array(640)}, False))
    db = DetectFeatLmdb(tmp_path / "img", compress=False, strict=False, **IMG_ARGS)
    dump = db.get_dump("i0.npz")
    assert dump["image_w"].shape == () and int(dump["image_w"]) == 640
    assert dump["features"].shape == (db.name2nbb["i0.npz"], D)


# ----------------------------------------------------------------------------- 3. regions in the detector's order

CONF = np.array([0.1, 0.9, 0.05, 0.5, 0.8, 0.3, 0.95, 0.01, 0.7, 0.6], np.float32)  # 7 above 0.2


@pytest.mark.parametrize("compress", [True, False])
def test_the_writer_keeps_the_first_regions_in_file_order(tmp_path, compress):
    arrays = {**_arrays(n=len(CONF)), "conf": CONF}
    with ImgDbWriter(tmp_path / "img", compress=compress, **IMG_ARGS) as w:
        assert w.add("x.npz", **arrays) == 7
    db = DetectFeatLmdb(tmp_path / "img", compress=compress, **IMG_ARGS)
    feat, bb = db["x.npz"]
    assert feat[:, 0].tolist() == list(range(7))  # rows 0..6 as given, not the 7 most confident sorted
    np.testing.assert_array_equal(bb.numpy(), arrays["norm_bb"][:7].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(db.get_dump("x.npz")["conf"], CONF[:7].astype(np.float16).astype(np.float32))


def test_ground_truth_boxes_stay_in_annotation_order(tmp_path):
    """A referring-expression gt db (conf_th -1): region j is annotation j whatever the detector's scores."""
    (tmp_path / "npz").mkdir()
    arrays = {**_arrays(n=5), "conf": np.array([0.3, 0.9, 0.5, 0.99, 0.1], np.float32)}
    np.savez(tmp_path / "npz" / "visual_grounding_coco_gt_000000000001.npz", **arrays)
    convert_images(tmp_path / "npz", tmp_path / "re_gt", conf_th=-1, num_bb=100)
    db = DetectFeatLmdb(tmp_path / "re_gt", conf_th=-1, num_bb=100)
    feat, bb = db["visual_grounding_coco_gt_000000000001.npz"]
    assert feat[:, 0].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(bb.numpy(), arrays["norm_bb"].astype(np.float16).astype(np.float32))


# ----------------------------------------------------------------------------- 4. a truncated data.mdb

_READ_ALL = """
import sys
from villa_fast.data import DataFormatError, DetectFeatLmdb
db = DetectFeatLmdb(sys.argv[1], 0.2, 8, 3, 8)
try:
    for name in db.name2nbb:
        db[name]
    print("read all")
except DataFormatError as exc:
    print(exc)
"""


def test_a_truncated_data_mdb_is_refused_before_any_read(tmp_path):
    make_images(tmp_path / "img", n=300)
    data = Path(_img_db_path(tmp_path / "img"), "data.mdb")
    full = os.path.getsize(data)
    # a read past the end of a truncated file is a SIGBUS, so the reader runs in a process of its own
    run = [sys.executable, "-c", _READ_ALL, str(tmp_path / "img")]
    assert subprocess.run(run, capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip() == "read all"
    os.truncate(data, full // 2 // 4096 * 4096)
    out = subprocess.run(run, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-500:]
    msg = out.stdout.strip()
    assert msg.startswith(
        f"{data}: truncated: the file has {full // 2 // 4096 * 4096} bytes but its pages in use end at"
    )
    assert msg.endswith("(an interrupted copy or download?)")


def _img_db_path(img_dir: Path) -> str:
    return str(img_dir / img_db_name(0.2, 8, 3, 8, True))


def test_a_data_mdb_that_is_no_lmdb_is_named(tmp_path):
    make_images(tmp_path / "img", n=4)
    data = Path(_img_db_path(tmp_path / "img"), "data.mdb")
    data.write_bytes(os.urandom(8192))
    with pytest.raises(DataFormatError, match=r"feat_th0.2_max8_min3_compressed: not a readable LMDB database"):
        DetectFeatLmdb(tmp_path / "img", **IMG_ARGS)["img000.npz"]


# ----------------------------------------------------------------------------- 5. image records checked on read


def _nan_features(a):
    a["features"][2, 3] = np.nan


def _inf_boxes(a):
    a["norm_bb"][1, 4] = -np.inf


BAD_IMAGES = {
    "nan_features": (_nan_features, r"'features' value at \[2, 3\] is nan, not a finite number"),
    "inf_norm_bb": (_inf_boxes, r"'norm_bb' value at \[1, 4\] is -inf, not a finite number"),
    "int_features": (lambda a: a.update(features=np.ones((6, D), np.int64)), "'features' has dtype int64, not a float"),
    "bool_features": (lambda a: a.update(features=np.ones((6, D), bool)), "'features' has dtype bool, not a float"),
    "complex_features": (lambda a: a.update(features=np.ones((6, D), np.complex64)), "'features' has dtype complex64"),
    "int_boxes": (lambda a: a.update(norm_bb=np.zeros((6, 6), np.int32)), "'norm_bb' has dtype int32, not a float"),
}


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_records_are_named_on_read(tmp_path, case, compress):
    edit, match = BAD_IMAGES[case]
    db_path = _img_db(tmp_path / "img", compress=compress)
    arrays = _f16(_arrays(seed=7))
    edit(arrays)
    _put(db_path, "i1.npz", encode_img_record(arrays, compress))
    db = DetectFeatLmdb(tmp_path / "img", compress=compress, **IMG_ARGS)
    where = rf"{db_path} key 'i1.npz': "
    with pytest.raises(DataFormatError, match=where + match):
        db["i1.npz"]
    with pytest.raises(DataFormatError, match=where + match):
        db.get_dump("i1.npz")
    db["i0.npz"]  # the others still read


@pytest.mark.parametrize("first_read", ["i0.npz", "i1.npz"])
def test_a_record_of_another_feature_width_is_named(tmp_path, first_read):
    db_path = _img_db(tmp_path / "img")
    _put(db_path, "i1.npz", npz_bytes(_f16(_arrays(width=D // 2))))
    db = DetectFeatLmdb(tmp_path / "img", **IMG_ARGS)
    if first_read == "i0.npz":
        db["i0.npz"]
    with pytest.raises(
        DataFormatError, match=rf"key 'i1.npz': 'features' are {D // 2} wide but the database's are {D}"
    ):
        db["i1.npz"]
    assert db.img_dim == D


def test_the_writer_refuses_another_feature_width_and_non_float_features(tmp_path):
    with pytest.raises(
        DataFormatError, match=rf"image 'b.npz': 'features' are {D + 1} wide but the earlier images' {D}"
    ):
        with ImgDbWriter(tmp_path / "a", **IMG_ARGS) as w:
            w.add("a.npz", **_arrays())
            w.add("b.npz", **_arrays(width=D + 1))
    with pytest.raises(DataFormatError, match=r"image 'a.npz': 'features' has dtype int64, not a floating-point type"):
        with ImgDbWriter(tmp_path / "b", **IMG_ARGS) as w:
            w.add("a.npz", **{**_arrays(), "features": np.ones((6, D), np.int64)})


# ----------------------------------------------------------------------------- 6. token ids and lengths


def _txt_db(path: Path, records: dict, lens: dict | None = None, meta: dict | None = None, extra=None) -> Path:
    with TxtDbWriter(path, dict(meta or META)) as w:
        for id_, rec in records.items():
            w.add(id_, {"img_fname": "img000.npz", **rec}, (lens or {}).get(id_))
        w.extra_json.update(extra or {})
    return path


def test_token_ids_outside_the_vocabulary_are_named(tmp_path):
    end = META["v_range"][1]
    path = _txt_db(
        tmp_path / "txt",
        {"ok": {"input_ids": [0, end - 1]}, "past": {"input_ids": [104, end]}, "neg": {"input_ids": [-3]}},
    )
    txt = TxtTokLmdb(path, -1)
    assert txt["ok"]["input_ids"] == [0, end - 1]
    with pytest.raises(DataFormatError, match=rf"key 'past': 'input_ids' is .*entry 1 is {end}, .*0 <= id < {end}"):
        txt["past"]
    with pytest.raises(DataFormatError, match=r"key 'neg': 'input_ids' is .*entry 0 is -3, not a token id"):
        txt["neg"]


def test_vcr_person_tags_follow_the_vocabulary(tmp_path):
    end = META["v_range"][1]
    last_tag = end + VCR_PERSON_TAGS - 1

    def rec(q, a):
        return {"input_ids": q, "input_ids_as": [a] * 4, "input_ids_rs": [[105]] * 4, "qa_target": 0, "qar_target": 0}

    recs = {
        "ok": rec([104, end, last_tag], [last_tag]),
        "q": rec([end + VCR_PERSON_TAGS], [105]),
        "a": rec([104], [-1]),
    }
    lens = {k: 9 for k in recs}
    path = _txt_db(tmp_path / "vcr", recs, lens, extra={"id2len_qa.json": lens, "id2len_qar.json": lens})
    txt = VcrTxtTokLmdb(path, -1, task="qa")
    assert txt["ok"]["input_ids"] == [104, end, last_tag]
    with pytest.raises(DataFormatError, match=rf"key 'q': 'input_ids' is .*{end + VCR_PERSON_TAGS}.*< {last_tag + 1}"):
        txt["q"]
    with pytest.raises(DataFormatError, match=r"key 'a': 'input_ids_as' candidate 0 is .*entry 0 is -1"):
        txt["a"]


def test_a_record_longer_than_its_id2len_entry_is_named(tmp_path):
    make_images(tmp_path / "img", n=2)
    recs = {"short": {"input_ids": [104] * 5}, "long": {"input_ids": [105] * 3}, "exact": {"input_ids": [106] * 2}}
    path = _txt_db(tmp_path / "txt", recs, {"short": 2, "long": 7})
    txt = TxtTokLmdb(path, 4)  # the 5-token record passes the max_txt_len filter on its stated 2
    assert "short" in txt.id2len
    with pytest.raises(DataFormatError, match=r"key 'short': 'input_ids' holds 5 tokens but id2len.json gives 2"):
        txt["short"]
    assert len(TxtTokLmdb(path, -1)["long"]["input_ids"]) == 3  # a larger length only pads more
    ds = VqaDataset(10, TxtTokLmdb(path, -1), DetectFeatLmdb(tmp_path / "img", **IMG_ARGS))
    with pytest.raises(DataFormatError, match="holds 5 tokens but id2len.json gives 2"):
        ds[ds.ids.index("short")]


def test_the_converter_refuses_ids_past_the_vocabulary(tmp_path):
    end = META["v_range"][1]
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": "q0", "input_ids": [104, end], "img_fname": "img000.npz"}))
    with pytest.raises(DataFormatError, match=rf"q.jsonl:1: 'input_ids' is .*entry 1 is {end}"):
        convert_texts("vqa", tmp_path / "q.jsonl", tmp_path / "txt", meta=META)


# ----------------------------------------------------------------------------- 7. side files


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    obj = edit(obj)
    path.write_text(json.dumps(obj))


def _set(key, value):
    def edit(obj):
        obj[key] = value
        return obj

    return edit


ID2LEN_CASES = {
    "list": (lambda o: list(o), r"id2len.json: must map names to counts, found a list"),
    "str": (_set("t0001", "3"), r"id2len.json: key 't0001' holds '3' \(str\), not a count"),
    "negative": (_set("t0001", -2), r"id2len.json: key 't0001' holds -2 \(int\), not a count"),
    "float": (_set("t0001", 3.0), r"id2len.json: key 't0001' holds 3.0 \(float\), not a count"),
    "bool": (_set("t0001", True), r"id2len.json: key 't0001' holds True \(bool\), not a count"),
}


META_CASES = {
    "cls_str": (_set("CLS", "[CLS]"), r"meta.json: key 'CLS' is '\[CLS\]' \(str\), not a token id"),
    "sep_float": (_set("SEP", 102.0), r"meta.json: key 'SEP' is 102.0 \(float\), not a token id"),
    "mask_negative": (_set("MASK", -1), r"meta.json: key 'MASK' is -1 \(int\), not a token id"),
    "v_range_str": (_set("v_range", "104,200"), r"meta.json: key 'v_range' is '104,200', not two token ids"),
    "v_range_one": (_set("v_range", [104]), r"meta.json: key 'v_range' is \[104\], not two token ids"),
    "v_range_floats": (_set("v_range", [104.0, 200.0]), r"key 'v_range' is \[104.0, 200.0\], not two token ids"),
    "v_range_reversed": (_set("v_range", [200, 104]), r"key 'v_range' is \[200, 104\], not two token ids"),
    "not_a_map": (lambda o: [o], r"meta.json: must be a JSON object, found a list"),
}


TXT_SIDE_CASES = [("id2len.json", c, *ID2LEN_CASES[c]) for c in ID2LEN_CASES] + [
    ("meta.json", c, *META_CASES[c]) for c in META_CASES
]


@pytest.mark.parametrize("name,case,edit,match", TXT_SIDE_CASES, ids=[f"{n}-{c}" for n, c, *_ in TXT_SIDE_CASES])
def test_bad_txt_db_side_files_are_named(tmp_path, name, case, edit, match):
    make_txt(tmp_path / "txt", ["img000.npz"], n=4)
    _edit_json(tmp_path / "txt" / name, edit)
    with pytest.raises(DataFormatError, match=match):
        TxtTokLmdb(tmp_path / "txt", 60)


NBB_CASES = {
    "list": (lambda o: list(o), rf"{NBB_FILE}: must map names to counts, found a list"),
    "negative": (_set("img000.npz", -3), rf"{NBB_FILE}: key 'img000.npz' holds -3 \(int\), not a count"),
    "float": (_set("img000.npz", 5.0), rf"{NBB_FILE}: key 'img000.npz' holds 5.0 \(float\), not a count"),
    "str": (_set("img000.npz", "5"), rf"{NBB_FILE}: key 'img000.npz' holds '5' \(str\), not a count"),
    "null": (_set("img000.npz", None), rf"{NBB_FILE}: key 'img000.npz' holds None \(NoneType\), not a count"),
}


@pytest.mark.parametrize("case", list(NBB_CASES))
def test_bad_box_count_files_are_named(tmp_path, case):
    edit, match = NBB_CASES[case]
    make_images(tmp_path / "img", n=3)
    _edit_json(tmp_path / "img" / NBB_FILE, edit)
    with pytest.raises(DataFormatError, match=match):
        DetectFeatLmdb(tmp_path / "img", **IMG_ARGS)


# ----------------------------------------------------------------------------- 8. numpy scalars in text records


def test_numpy_scalars_in_text_records_are_read_as_numbers(tmp_path):
    make_images(tmp_path / "img", n=2)
    rec = {
        "input_ids": [np.int64(120), np.int32(121), 122],
        "target": {"labels": [np.int64(3), 1], "scores": [np.float32(0.5), np.float64(0.25)]},
    }
    path = _txt_db(tmp_path / "txt", {"q": rec, "n": {"input_ids": [np.uint16(130)], "target": np.int64(1)}})
    txt = TxtTokLmdb(path, -1)
    got = txt["q"]
    assert got["input_ids"] == [120, 121, 122] and all(type(x) is int for x in got["input_ids"])
    assert got["target"] == {"labels": [3, 1], "scores": [0.5, 0.25]}
    assert [type(x) for x in got["target"]["labels"] + got["target"]["scores"]] == [int, int, float, float]
    assert type(txt["n"]["target"]) is int and txt["n"]["input_ids"] == [130]
    ds = VqaDataset(5, txt, DetectFeatLmdb(tmp_path / "img", **IMG_ARGS))
    batch = vqa_collate([ds[ds.ids.index("q")]])
    assert batch["targets"][0].tolist() == [0.0, 0.25, 0.0, 0.5, 0.0]
    # np.float32 is no label, a string no score
    with pytest.raises(
        DataFormatError, match=r"target .labels. is a list whose entry 0 is np.float32\(3.0\) \(float32\)"
    ):
        check_txt_record({"input_ids": [1], "target": {"labels": [np.float32(3)], "scores": [1.0]}}, "w")


def test_an_image_listed_without_a_record_does_not_stop_the_others(tmp_path):
    # a filtered database: its box counts list an image first that has no record; the width comes from one that has
    _img_db(tmp_path / "img")
    nbb = tmp_path / "img" / NBB_FILE
    counts = json.loads(nbb.read_text())
    nbb.write_text(json.dumps({"gone.npz": 5, **counts}))
    db = DetectFeatLmdb(tmp_path / "img", **IMG_ARGS)
    assert db.img_dim == D
    feat, _ = db["i1.npz"]
    assert feat.shape[1] == D
    fresh = DetectFeatLmdb(tmp_path / "img", **IMG_ARGS)
    assert fresh["i2.npz"][0].shape[1] == D  # a read before img_dim was asked for
    with pytest.raises(KeyError, match="gone.npz"):
        fresh["gone.npz"]
