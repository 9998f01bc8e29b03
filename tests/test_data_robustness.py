"""Bad data gets a clear error naming the file and key: txt2img entries, records pointing at other images,
non-finite values, converter labels and fields; box counts computed without ``nbb_*.json``."""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest

from tests.test_data_helpers import IMG_ARGS, META, D, make_images, make_txt
from villa_fast.data import (
    DataFormatError,
    DetectFeatLmdb,
    ImgDbWriter,
    ItmDataset,
    MlmDataset,
    MlmDatasetForVcr,
    MrcDataset,
    MrcDatasetForVcr,
    MrfrDataset,
    Nlvr2PairedDataset,
    Nlvr2TripletDataset,
    TxtLmdb,
    TxtTokLmdb,
    VcrDataset,
    VcrEvalDataset,
    VcrTxtTokLmdb,
    VqaDataset,
    VqaEvalDataset,
)
from villa_fast.data import db as db_module
from villa_fast.data.convert import convert_texts
from villa_fast.data.db import check_txt_record, compute_num_bb

NAMES = [f"img{k:03d}.npz" for k in range(8)]


def _rewrite_txt2img(txt_dir, edit) -> None:
    path = txt_dir / "txt2img.json"
    txt2img = json.loads(path.read_text())
    edit(txt2img)
    path.write_text(json.dumps(txt2img))


@pytest.fixture()
def img(tmp_path):
    make_images(tmp_path / "img", n=len(NAMES))
    return DetectFeatLmdb(tmp_path / "img", **IMG_ARGS)


# ----------------------------------------------------------------------------- 1. txt2img entries of the wrong form


def test_single_image_entry_given_as_a_list_names_the_file_and_text(tmp_path, img):
    make_txt(tmp_path / "txt", NAMES, n=12)
    _rewrite_txt2img(tmp_path / "txt", lambda t: t.update(t0003=["img000.npz", "img001.npz"]))
    with pytest.raises(DataFormatError, match=r"txt/txt2img\.json: text 't0003' .*VqaDataset expects an image name"):
        VqaDataset(10, TxtTokLmdb(tmp_path / "txt", -1), img)


@pytest.mark.parametrize("cls", [Nlvr2PairedDataset, Nlvr2TripletDataset])
def test_nlvr2_on_a_single_image_txt_db_is_a_format_error(tmp_path, img, cls):
    make_txt(tmp_path / "txt", NAMES, n=12)  # one image name per text
    with pytest.raises(DataFormatError, match=r"txt2img\.json: text 't0000' refers to 'img000\.npz'.*list of 2 image"):
        cls(TxtTokLmdb(tmp_path / "txt", -1), img)


@pytest.mark.parametrize(
    "entry", [["img000.npz"], ["img000.npz", "img001.npz", "img002.npz"], ["img000.npz", 3], "img000.npz"]
)
def test_two_image_entries_must_be_two_names(tmp_path, img, entry):
    make_txt(tmp_path / "nlvr2", NAMES, n=12, task="nlvr2")
    make_txt(tmp_path / "vcr", NAMES, n=12, task="vcr")
    for task in ("nlvr2", "vcr"):
        _rewrite_txt2img(tmp_path / task, lambda t: t.update(t0005=entry))
    with pytest.raises(DataFormatError, match=r"nlvr2/txt2img\.json: text 't0005'.*statement's two images"):
        Nlvr2PairedDataset(TxtTokLmdb(tmp_path / "nlvr2", -1), img)
    with pytest.raises(DataFormatError, match=r"vcr/txt2img\.json: text 't0005'.*ground-truth boxes image"):
        VcrDataset(VcrTxtTokLmdb(tmp_path / "vcr", -1, task="qa"), img, img)


def test_txt2img_must_be_a_map(tmp_path, img):
    make_txt(tmp_path / "txt", NAMES, n=4)
    (tmp_path / "txt" / "txt2img.json").write_text(json.dumps(NAMES))
    with pytest.raises(DataFormatError, match=r"txt2img\.json: must map text ids to images"):
        VqaDataset(10, TxtTokLmdb(tmp_path / "txt", -1), img)


# ----------------------------------------------------------------------------- 2. items load the txt2img images


def _vcr_txt(path):
    return VcrTxtTokLmdb(path, -1, task="qa")


# (txt_db task, dataset factory, number of regions of item 0)
DATASETS = {
    "vqa": ("vqa", lambda t, i: VqaDataset(10, TxtTokLmdb(t, -1), i), lambda x: x[1].size(0)),
    "vqa_eval": ("vqa", lambda t, i: VqaEvalDataset(10, TxtTokLmdb(t, -1), i), lambda x: x[2].size(0)),
    "mlm": ("vqa", lambda t, i: MlmDataset(TxtTokLmdb(t, -1), i), lambda x: x[1].size(0)),
    "mrfr": ("vqa", lambda t, i: MrfrDataset(0.15, TxtTokLmdb(t, -1), i), lambda x: x[1].size(0)),
    "mrc": ("vqa", lambda t, i: MrcDataset(0.15, TxtTokLmdb(t, -1), i), lambda x: x[1].size(0)),
    "itm": ("vqa", lambda t, i: ItmDataset(TxtTokLmdb(t, -1), i, neg_sample_p=0.0), lambda x: x[1].size(0)),
    "nlvr2_paired": (
        "nlvr2",
        lambda t, i: Nlvr2PairedDataset(TxtTokLmdb(t, -1), i),
        lambda x: max(r[1].size(0) for r in x[0]),
    ),
    "nlvr2_triplet": ("nlvr2", lambda t, i: Nlvr2TripletDataset(TxtTokLmdb(t, -1), i), lambda x: x[1].size(0)),
    "vcr": ("vcr", lambda t, i: VcrDataset(_vcr_txt(t), i, i), lambda x: x[0][2].size(0)),
    "vcr_eval": (
        "vcr",
        lambda t, i: VcrEvalDataset("val", VcrTxtTokLmdb(t, -1, task="qa,qar"), i, i),
        lambda x: x[0][0][2].size(0),
    ),
    "mlm_vcr": ("vcr", lambda t, i: MlmDatasetForVcr(_vcr_txt(t), i, i), lambda x: x[1].size(0)),
    "mrc_vcr": ("vcr", lambda t, i: MrcDatasetForVcr(0.15, _vcr_txt(t), i, i), lambda x: x[1].size(0)),
}


def _other_image(img, name: str) -> str:
    """An image of the db with another region count than ``name``."""
    return next(n for n in NAMES if img.name2nbb[n] != img.name2nbb[name])


@pytest.mark.parametrize("kind", list(DATASETS))
def test_a_record_pointing_at_other_images_than_txt2img_is_refused(tmp_path, img, kind):
    """lens / pad_dims are computed from txt2img.json: an item reading the record's own img_fname could exceed
    them; a disagreement is an error naming the key, and a record without img_fname reads txt2img's images."""
    task, make, regions = DATASETS[kind]
    for name in ("txt", "no_fname"):
        recs = make_txt(tmp_path / name, NAMES, n=12, task=task)
    ref = recs["t0000"]["img_fname"]
    if isinstance(ref, str):
        moved = _other_image(img, ref)
    else:
        moved = [ref[0], _other_image(img, ref[1])]
    # the same record without img_fname (written before any reader opens the db)
    writer = TxtLmdb(tmp_path / "no_fname", readonly=False)
    writer["t0000"] = {k: v for k, v in recs["t0000"].items() if k != "img_fname"}
    writer.close()
    for name in ("txt", "no_fname"):
        _rewrite_txt2img(tmp_path / name, lambda t: t.update(t0000=moved))
    ds = make(tmp_path / "txt", img)
    assert ds.ids[0] == "t0000"
    with pytest.raises(DataFormatError, match=r"key 't0000': the record's img_fname .* disagrees with .*txt2img"):
        ds[0]
    # without img_fname the item is txt2img's images, of the regions pad_dims allows for
    ds = make(tmp_path / "no_fname", img)
    assert regions(ds[0]) <= ds.pad_dims[0][1]
    want = sum(img.name2nbb[n] for n in ([moved] if isinstance(moved, str) else moved))
    if kind == "nlvr2_paired":
        want = max(img.name2nbb[n] for n in moved)
    assert regions(ds[0]) == want


# ----------------------------------------------------------------------------- 3. non-finite values


def _arrays(n: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 0.5, (n, 2))
    wh = rng.uniform(0.1, 0.5, (n, 2))
    return {
        "features": rng.normal(size=(n, D)).astype(np.float32),
        "norm_bb": np.concatenate([xy, xy + wh, wh], 1).astype(np.float32),
        "conf": np.linspace(0.9, 0.5, n).astype(np.float32),
    }


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("features", 1e6, r"image 'bad\.npz': 'features' value 1000000\.0 at \[1, 2\] is outside the float16 range"),
        ("features", -7e4, r"'features' value -70000\.0 .*float16 range.*stores float32 arrays as float16"),
        ("features", np.nan, r"image 'bad\.npz': 'features' value at \[1, 2\] is nan, not a finite number"),
        ("norm_bb", np.inf, r"image 'bad\.npz': 'norm_bb' value at \[1, 2\] is inf"),
        ("conf", np.nan, r"image 'bad\.npz': 'conf' region 1 is nan"),
    ],
)
def test_img_db_writer_refuses_non_finite_values(tmp_path, key, value, message):
    arrays = _arrays()
    arrays[key][(1, 2) if arrays[key].ndim == 2 else 1] = value
    with ImgDbWriter(tmp_path / "img", **IMG_ARGS) as w:
        w.add("good.npz", **_arrays(seed=1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a clear error, not numpy's overflow warning
            with pytest.raises(DataFormatError, match=message):
                w.add("bad.npz", **arrays)
    assert list(DetectFeatLmdb(tmp_path / "img", **IMG_ARGS).name2nbb) == ["good.npz"]


def test_img_db_writer_keeps_values_at_the_float16_limit(tmp_path):
    arrays = _arrays()
    arrays["features"][0, 0] = 65504.0
    with ImgDbWriter(tmp_path / "img", **IMG_ARGS) as w:
        w.add("edge.npz", **arrays)
    assert DetectFeatLmdb(tmp_path / "img", **IMG_ARGS)["edge.npz"][0].max().item() == 65504.0


@pytest.mark.parametrize(
    "scores", [[1.0, math.nan], [math.inf, 0.3], np.array([0.3, np.nan]), np.array([-np.inf], dtype=np.float16)]
)
def test_non_finite_vqa_scores_are_refused(scores):
    labels = list(range(len(scores)))
    with pytest.raises(DataFormatError, match=r"db key 'q1': target 'scores' is .*entry \d+ is .*not a finite number"):
        check_txt_record({"input_ids": [5], "target": {"labels": labels, "scores": scores}}, "db key 'q1'")
    check_txt_record({"input_ids": [5], "target": {"labels": labels, "scores": [0.3] * len(labels)}}, "ok")


def test_a_non_finite_score_stops_the_reader_and_the_converter(tmp_path, img):
    recs = make_txt(tmp_path / "txt", NAMES, n=4)
    writer = TxtLmdb(tmp_path / "txt", readonly=False)
    writer["t0002"] = {**recs["t0002"], "target": {"labels": [1], "scores": [float("nan")]}}
    writer.close()
    ds = VqaDataset(10, TxtTokLmdb(tmp_path / "txt", -1), img)
    with pytest.raises(DataFormatError, match=r"txt key 't0002': target 'scores'.*not a finite number"):
        ds[2]
    lines = [{"id": "q0", "input_ids": [7], "img_fname": "im0.npz", "target": {"labels": [0], "scores": [math.nan]}}]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines))  # json writes NaN, which json reads back
    with pytest.raises(DataFormatError, match=r"q\.jsonl:1: target 'scores'.*not a finite number"):
        convert_texts("vqa", jsonl, tmp_path / "out", meta=META)


# ----------------------------------------------------------------------------- 4. converter labels and fields


def re_escape(v) -> str:
    return re.escape(repr(v))


def _convert(tmp_path, task: str, examples: list[dict], name: str = "x"):
    jsonl = tmp_path / f"{name}.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in examples))
    convert_texts(task, jsonl, tmp_path / f"{name}_db", meta=META)
    return TxtTokLmdb(tmp_path / f"{name}_db", -1)


def _bad(tmp_path, task: str, example: dict, message: str, name: str = "bad") -> None:
    good = {"id": "ok", "input_ids": [7], "img_fname": "a.npz"}
    if task in ("nlvr2", "vcr"):
        good["img_fname"] = ["a.npz", "b.npz"]
    good.update({"ve": {"label": 0}, "nlvr2": {"label": True}}.get(task, {}))
    if task == "vcr":
        good.update(answers=[[7]] * 4, rationales=[[8]] * 4, answer_label=0, rationale_label=1)
    jsonl = tmp_path / f"{name}.jsonl"
    jsonl.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "two", **example}))
    with pytest.raises(DataFormatError, match=rf"{name}\.jsonl:2: {message}"):
        convert_texts(task, jsonl, tmp_path / f"{name}_db", meta=META)


def test_ve_labels_are_the_three_names_in_any_case_or_their_indices(tmp_path):
    given = ["Entailment", "CONTRADICTION", "neutral", 0, 1, 2]
    txt = _convert(tmp_path, "ve", [{"id": f"v{k}", "input_ids": [7], "img_fname": "a.npz", "label": lab}
                                    for k, lab in enumerate(given)])  # fmt: skip
    assert [txt[f"v{k}"]["target"]["labels"] for k in range(6)] == [[1], [0], [2], [0], [1], [2]]
    for k, bad in enumerate([3, -1, True, "entails", 1.0, None, "1"]):
        _bad(tmp_path, "ve", {"label": bad}, rf"ve 'label' {re_escape(bad)} is not one of", name=f"ve{k}")
    no_label = {"id": "two", "input_ids": [7], "img_fname": "a.npz"}
    jsonl = tmp_path / "nolabel.jsonl"
    jsonl.write_text(json.dumps(no_label))
    with pytest.raises(DataFormatError, match=r"nolabel\.jsonl:1: missing key 'label' \(a ve example needs it\)"):
        convert_texts("ve", jsonl, tmp_path / "nolabel_db", meta=META)


def test_nlvr2_labels_are_explicit(tmp_path):
    given = [True, False, 1, 0, "true", "FALSE", "True", "1", "0"]
    txt = _convert(tmp_path, "nlvr2", [{"id": f"n{k}", "input_ids": [7], "img_fname": ["a.npz", "b.npz"],
                                        "label": lab} for k, lab in enumerate(given)])  # fmt: skip
    assert [txt[f"n{k}"]["target"] for k in range(len(given))] == [1, 0, 1, 0, 1, 0, 1, 1, 0]
    for k, bad in enumerate(["yes", "no", 2, -1, 1.0, None, "", [1]]):
        _bad(tmp_path, "nlvr2", {"label": bad}, rf"nlvr2 'label' {re_escape(bad)} is not true / false", f"n{k}")
    _bad(tmp_path, "nlvr2", {"img_fname": "a.npz"}, "nlvr2 needs 'img_fname' as a list of two", "i")
    no_label = {"id": "two", "input_ids": [7], "img_fname": ["a.npz", "b.npz"]}
    (tmp_path / "nolabel.jsonl").write_text(json.dumps(no_label))
    with pytest.raises(DataFormatError, match=r"nolabel\.jsonl:1: missing key 'label' \(a nlvr2 example needs it\)"):
        convert_texts("nlvr2", tmp_path / "nolabel.jsonl", tmp_path / "nolabel_db", meta=META)


def test_other_converter_fields_give_format_errors_naming_the_line(tmp_path):
    _bad(tmp_path, "vqa", {"img_fname": ["a.npz", "b.npz"]}, "vqa needs 'img_fname' as an image name", "a")
    _bad(tmp_path, "caption", {"img_fname": 5}, "caption needs 'img_fname' as an image name", "b")
    _bad(tmp_path, "vcr", {"img_fname": "a.npz"}, r"vcr needs 'img_fname' as a list of two names", "c")
    _bad(tmp_path, "vqa", {"target": {"labels": [1]}}, r"vqa 'target' must be", "d")
    _bad(tmp_path, "vqa", {"target": [1]}, r"vqa 'target' must be", "e")
    for k, key in enumerate(("answers", "rationales")):
        ex = {"id": "two", "input_ids": [7], "img_fname": ["a.npz", "b.npz"], "answers": [[7]], "rationales": [[8]]}
        del ex[key]
        jsonl = tmp_path / f"v{k}.jsonl"
        jsonl.write_text(json.dumps(ex))
        with pytest.raises(DataFormatError, match=rf"v{k}\.jsonl:1: missing key '{key}' \(a vcr example needs it\)"):
            convert_texts("vcr", jsonl, tmp_path / f"v{k}_db", meta=META)
    _bad(tmp_path, "vcr", {"answers": []}, "vcr 'answers' must be a non-empty list", "f")
    _bad(tmp_path, "vcr", {"answer_label": 4}, r"vcr 'answer_label' 4 is not a candidate index in \[0, 4\)", "g")
    _bad(tmp_path, "vcr", {"rationale_label": "2"}, r"vcr 'rationale_label' '2' is not a candidate index", "h")
    _bad(tmp_path, "vqa", {"img_fname": None}, "vqa needs 'img_fname'", "j")
    (tmp_path / "list.jsonl").write_text("[1, 2]")
    with pytest.raises(DataFormatError, match=r"list\.jsonl:1: an example must be a JSON object"):
        convert_texts("vqa", tmp_path / "list.jsonl", tmp_path / "list_db", meta=META)
    # a test record without labels keeps -1
    txt = _convert(tmp_path, "vcr", [{"id": "t", "input_ids": [7], "img_fname": ["a.npz", "b.npz"],
                                      "answers": [[7]] * 4, "rationales": [[8]] * 4}], "vcrtest")  # fmt: skip
    assert (txt["t"]["qa_target"], txt["t"]["qar_target"]) == (-1, -1)


# ----------------------------------------------------------------------------- 5. box counts without nbb_*.json


@pytest.mark.parametrize("compress", [True, False])
def test_box_counts_without_nbb_file_decode_only_conf_and_are_cached(tmp_path, monkeypatch, compress):
    monkeypatch.setenv("VILLA_FAST_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    raw = {}
    with ImgDbWriter(tmp_path / "img", compress=compress, keep_all=True, **IMG_ARGS) as w:
        for k in range(6):
            arrays = _arrays(n=int(rng.integers(2, 10)), seed=k)
            arrays["conf"] = rng.uniform(0, 1, arrays["conf"].shape).astype(np.float32)
            arrays["soft_labels"] = rng.dirichlet(np.ones(5), arrays["conf"].shape[0]).astype(np.float32)
            w.add(f"im{k}.npz", **arrays)
            raw[f"im{k}.npz"] = arrays
    assert not list((tmp_path / "img").glob("nbb_*.json"))
    want = {n: compute_num_bb(a["conf"].astype(np.float16), 0.2, 3, 8) for n, a in raw.items()}

    decode = db_module.decode_img_record
    asked = []

    def spy(raw_bytes, where="", keys=None):
        asked.append(keys)
        out = decode(raw_bytes, where=where, keys=keys)
        if compress:  # the other arrays are never parsed
            assert all(v.size == 0 for k, v in out.items() if k != "conf")
        return out

    monkeypatch.setattr(db_module, "decode_img_record", spy)
    db = DetectFeatLmdb(tmp_path / "img", compress=compress, **IMG_ARGS)
    assert db.name2nbb == want
    # and the authors' stray 0-d allow_pickle member, when a record has one (read to tell it from data)
    assert asked == [("conf", "allow_pickle")] * 6
    cached = list((tmp_path / "cache" / "box_counts").glob("*.json"))
    assert len(cached) == 1
    # a later start reads the cache, no record
    monkeypatch.setattr(db_module, "decode_img_record", lambda *a, **k: pytest.fail("records read despite the cache"))
    assert DetectFeatLmdb(tmp_path / "img", compress=compress, **IMG_ARGS).name2nbb == want
    # other selection settings are counted anew (and cached apart)
    monkeypatch.setattr(db_module, "decode_img_record", decode)
    other = DetectFeatLmdb(tmp_path / "img", compress=compress, conf_th=0.5, max_bb=8, min_bb=2)
    assert other.name2nbb == {n: compute_num_bb(a["conf"].astype(np.float16), 0.5, 2, 8) for n, a in raw.items()}
    assert len(list((tmp_path / "cache" / "box_counts").glob("*.json"))) == 2
    # the features read back are the selected regions
    feat, _ = db["im0.npz"]
    assert feat.shape == (want["im0.npz"], D)


def test_box_counts_need_conf(tmp_path, monkeypatch):
    monkeypatch.setenv("VILLA_FAST_CACHE", str(tmp_path / "cache"))
    import lmdb

    from villa_fast.data.codec import encode_img_record

    with ImgDbWriter(tmp_path / "img", keep_all=True, **IMG_ARGS) as w:
        w.add("im0.npz", **_arrays())
    env = lmdb.open(str(tmp_path / "img" / "all_compressed"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        a = _arrays()
        txn.put(b"im0.npz", encode_img_record({"features": a["features"], "norm_bb": a["norm_bb"]}, True))
    env.close()
    with pytest.raises(DataFormatError, match=r"all_compressed key 'im0\.npz': missing key 'conf'.*nbb_th0\.2"):
        DetectFeatLmdb(tmp_path / "img", **IMG_ARGS)


def test_lmdb_readahead_is_off_with_several_processes(tmp_path, monkeypatch):
    """As the authors' readers open their databases: read-ahead in one process, none when WORLD_SIZE > 1."""
    import lmdb

    from villa_fast.data.db import _LazyEnv

    path = tmp_path / "db"
    lmdb.open(str(path), map_size=1 << 20).close()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _LazyEnv(str(path)).readahead is True
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert _LazyEnv(str(path)).readahead is False
    assert _LazyEnv(str(path), readahead=True).readahead is True
