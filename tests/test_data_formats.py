"""Official LMDB formats: round trips, safe decoding, bad input, the convert entry point."""

from __future__ import annotations

import io
import json
import pickle

import lmdb
import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import torch

from tests.test_data_helpers import IMG_ARGS, META, D, make_images, make_txt
from villa_fast.data import DataFormatError, DetectFeatLmdb, TxtTokLmdb, VqaDataset, build_dataloader, vqa_collate
from villa_fast.data.codec import decode_img_record, decode_txt_record, encode_img_record, encode_txt_record
from villa_fast.data.convert import convert_texts
from villa_fast.data.convert import main as convert_main
from villa_fast.data.db import compute_num_bb


def test_txt_record_round_trip_and_official_encoding():
    rec = {
        "input_ids": [5, 6, 7],
        "img_fname": "a.npz",
        "target": {"labels": [1], "scores": [0.6]},
        "arr": np.arange(3),
    }
    raw = encode_txt_record(rec)
    # what the authors' reader does: lz4 frame, msgpack with msgpack-numpy
    theirs = msgpack.loads(lz4.frame.decompress(raw), raw=False, object_hook=msgpack_numpy.decode)
    assert theirs["input_ids"] == [5, 6, 7] and theirs["target"] == rec["target"]
    ours = decode_txt_record(raw)
    np.testing.assert_array_equal(ours["arr"], np.arange(3))
    assert ours["img_fname"] == "a.npz"


@pytest.mark.parametrize("compress", [True, False])
def test_img_record_round_trip(compress):
    arrays = {"features": np.random.rand(4, 8).astype(np.float16), "norm_bb": np.random.rand(4, 6).astype(np.float16)}
    raw = encode_img_record(arrays, compress)
    if compress:  # the authors read these with np.load
        with np.load(io.BytesIO(raw)) as z:
            np.testing.assert_array_equal(z["features"], arrays["features"])
    else:
        theirs = msgpack.loads(raw, raw=False, object_hook=msgpack_numpy.decode)
        np.testing.assert_array_equal(theirs["norm_bb"], arrays["norm_bb"])
    out = decode_img_record(raw)
    for k, v in arrays.items():
        assert out[k].dtype == v.dtype
        np.testing.assert_array_equal(out[k], v)


def test_pickle_is_never_executed():
    obj = np.array([{"x": 1}], dtype=object)
    packed = msgpack.packb({"features": obj}, use_bin_type=True, default=msgpack_numpy.encode)
    with pytest.raises(DataFormatError, match="pickle"):
        decode_img_record(packed, where="db key 'x'")
    buf = io.BytesIO()
    np.savez(buf, features=obj)
    with pytest.raises(DataFormatError, match="pickle"):
        decode_img_record(buf.getvalue())
    with pytest.raises(DataFormatError, match="pickle"):
        decode_txt_record(lz4.frame.compress(packed), where="t")
    # a plain pickle is not a record of any kind
    with pytest.raises(DataFormatError):
        decode_img_record(pickle.dumps({"features": np.zeros(2)}))


def test_corrupt_records_name_the_key():
    with pytest.raises(DataFormatError, match="dbdir key 'q1'.*corrupt"):
        decode_txt_record(encode_txt_record({"a": 1})[:-7], where="dbdir key 'q1'")
    raw = encode_img_record({"features": np.zeros((2, 3), np.float16)}, True)
    with pytest.raises(DataFormatError, match="img.npz"):
        decode_img_record(raw[: len(raw) // 2], where="imgdb key 'img.npz'")


@pytest.mark.parametrize("compress", [True, False])
def test_img_db_round_trip_and_selection(tmp_path, compress):
    raw = make_images(tmp_path / "img", n=6, compress=compress)
    db = DetectFeatLmdb(tmp_path / "img", compress=compress, **IMG_ARGS)
    assert db.img_dim == D and len(db) == 6
    for name, arrays in raw.items():
        # the first nbb regions in the order written, as the authors' conversion script keeps them
        n = len(arrays["conf"])
        nbb = min(compute_num_bb(arrays["conf"], 0.2, IMG_ARGS["min_bb"], IMG_ARGS["max_bb"]), n)
        assert db.name2nbb[name] == nbb
        feat, bb = db[name]
        # features keep the stored float16 (the model widens them), boxes come back float32
        assert feat.dtype == torch.float16 and bb.dtype == torch.float32
        assert feat.shape == (nbb, D) and bb.shape == (nbb, 6)
        want = arrays["features"][:nbb].astype(np.float16)
        np.testing.assert_array_equal(feat.numpy(), want)
        dump = db.get_dump(name)
        np.testing.assert_array_equal(dump["features"], want)
        assert dump["features"].dtype == np.float16 and dump["norm_bb"].dtype == np.float32
        assert dump["soft_labels"].dtype == np.float16 and dump["soft_labels"].shape[0] == nbb
        want_soft = arrays["soft_labels"][:nbb].astype(np.float16)
        np.testing.assert_array_equal(dump["soft_labels"], want_soft)
    nbb_file = tmp_path / "img" / "nbb_th0.2_max8_min3.json"
    assert json.loads(nbb_file.read_text()) == db.name2nbb
    sub = "feat_th0.2_max8_min3" + ("_compressed" if compress else "")
    assert db.db_path.endswith(sub)
    assert json.loads(bytes(db._env.get(b"__keys__"))) == list(raw)


def test_txt_db_round_trip_and_side_files(tmp_path, caplog):
    make_images(tmp_path / "img", n=4)
    recs = make_txt(tmp_path / "txt", sorted(f"img{k:03d}.npz" for k in range(4)), n=20, max_len=12)
    db = TxtTokLmdb(tmp_path / "txt", max_txt_len=-1)
    assert set(db.id2len) == set(recs)
    for id_, rec in recs.items():
        assert db[id_]["input_ids"] == rec["input_ids"]
        assert db.id2len[id_] == len(rec["input_ids"])
        assert db.txt2img[id_] == rec["img_fname"]
        assert id_ in db.img2txts[rec["img_fname"]]
    assert db.cls_ == 101 and db.sep == 102 and db.mask == 103
    assert db.combine_inputs([5], [6, 7]).tolist() == [101, 5, 102, 6, 7, 102]
    with caplog.at_level("INFO"):
        short = TxtTokLmdb(tmp_path / "txt", max_txt_len=6)
    n_long = sum(len(r["input_ids"]) > 6 for r in recs.values())
    assert short.num_too_long == n_long and len(short.id2len) == 20 - n_long
    assert n_long == 0 or "longer than max_txt_len" in caplog.text


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing txt_db directory"):
        TxtTokLmdb(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="img_db"):
        DetectFeatLmdb(tmp_path / "nope")
    make_images(tmp_path / "img", n=3)
    names = [f"img{k:03d}.npz" for k in range(3)]
    make_txt(tmp_path / "txt", names + ["ghost.npz"], n=8)
    img = DetectFeatLmdb(tmp_path / "img", **IMG_ARGS)
    txt = TxtTokLmdb(tmp_path / "txt", -1)
    with pytest.raises(DataFormatError, match="ghost.npz.*extension included"):
        VqaDataset(10, txt, img)
    ds = VqaDataset(10, txt, img, skip_missing_images=True)
    assert ds.num_missing_img == 2 and len(ds) == 6
    with pytest.raises(KeyError, match="no text record with key 'zzz'"):
        txt["zzz"]
    with pytest.raises(KeyError, match="not in the image database"):
        img["ghost.npz"]
    with pytest.raises(FileNotFoundError, match="box counts"):
        DetectFeatLmdb(tmp_path / "img", conf_th=0.5, max_bb=8, min_bb=3)
    (tmp_path / "txt" / "id2len.json").unlink()
    with pytest.raises(FileNotFoundError, match="id2len.json"):
        TxtTokLmdb(tmp_path / "txt")


def test_unknown_and_corrupt_image_records(tmp_path):
    make_images(tmp_path / "img", n=2)
    path = str(tmp_path / "img" / "feat_th0.2_max8_min3_compressed")
    env = lmdb.open(path, map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"img000.npz", encode_img_record({"features": np.zeros((3, D), np.float16),
                                                  "norm_bb": np.zeros((3, 6), np.float16),
                                                  "extra": np.zeros(3)}, True))  # fmt: skip
        txn.put(b"img001.npz", b"PK\x03\x04garbage")
    env.close()
    db = DetectFeatLmdb(tmp_path / "img", **IMG_ARGS)
    with pytest.raises(DataFormatError, match=r"img000.npz.*unknown keys \['extra'\]"):
        db["img000.npz"]
    with pytest.raises(DataFormatError, match="img001.npz"):
        db["img001.npz"]
    lenient = DetectFeatLmdb(tmp_path / "img", strict=False, **IMG_ARGS)
    assert lenient["img000.npz"][0].shape[1] == D


def test_loader_with_workers_matches_single_process(tmp_path):
    make_images(tmp_path / "img", n=6)
    make_txt(tmp_path / "txt", [f"img{k:03d}.npz" for k in range(6)], n=30)
    ds = VqaDataset(10, TxtTokLmdb(tmp_path / "txt", -1), DetectFeatLmdb(tmp_path / "img", **IMG_ARGS))
    ds[0]  # the parent opens the environments first: workers must not reuse them
    out = {}
    for workers in (0, 2):
        ld = build_dataloader(ds, vqa_collate, batch_size_tokens=200, is_train=True, seed=3, num_workers=workers)
        out[workers] = list(ld)
    assert len(out[0]) == len(out[2])
    for a, b in zip(out[0], out[2], strict=True):
        assert torch.equal(a["img_feat"], b["img_feat"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_convert_cli(tmp_path, capsys):
    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        np.savez(npz_dir / f"im{k}.npz", features=rng.normal(size=(5, D)).astype(np.float32),
                 norm_bb=rng.uniform(size=(5, 6)).astype(np.float32), conf=np.linspace(0.9, 0.1, 5))  # fmt: skip
    assert convert_main(["img", "--npz-dir", str(npz_dir), "--output", str(tmp_path / "img"),
                         "--conf-th", "0.2", "--max-bb", "8", "--min-bb", "3"]) == 0  # fmt: skip
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "!", "?", "what", "is", "it", "red"]))
    jsonl = tmp_path / "q.jsonl"
    lines = [
        {"id": "q0", "question": "What is it?", "img_fname": "im0.npz", "answers": [{"answer": "red", "score": 1.0}]},
        {"id": "q1", "question": "what is red", "img_fname": "im2.npz", "answers": [{"answer": "blue", "score": 0.3}]},
    ]
    jsonl.write_text("\n".join(json.dumps(x) for x in lines))
    (tmp_path / "a2l.json").write_text(json.dumps({"red": 0, "green": 1}))
    argv = ["txt", "--task", "vqa", "--jsonl", str(jsonl), "--vocab", str(vocab), "--lowercase"]
    assert convert_main([*argv, "--ans2label", str(tmp_path / "a2l.json"), "--output", str(tmp_path / "txt")]) == 0
    txt = TxtTokLmdb(tmp_path / "txt", -1)
    assert txt["q0"]["input_ids"] == [7, 8, 9, 6] and txt["q0"]["target"] == {"labels": [0], "scores": [1.0]}
    assert txt["q1"]["target"] == {"labels": [], "scores": []}
    img = DetectFeatLmdb(tmp_path / "img", conf_th=0.2, max_bb=8, min_bb=3)
    assert img.name2nbb == {"im0.npz": 4, "im1.npz": 4, "im2.npz": 4}
    ds = VqaDataset(2, txt, img)
    batch = vqa_collate([ds[0], ds[1]])
    assert batch["targets"].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert "wrote 2 examples" in capsys.readouterr().out


def test_convert_vqa_raw_answers_become_soft_scores(tmp_path):
    """The annotators' raw answers (no score) are counted into the official soft scores (0.3 per annotator, 1 from
    four on); scored answers keep their score (the highest where one is listed twice); a mix is refused."""
    from villa_fast.data.convert import convert_texts, vqa_soft_score

    assert [vqa_soft_score(n) for n in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    raw = ["red"] * 5 + ["green"] * 2 + ["blue", "maroon", "green"]
    scored = [{"answer": "red", "score": 0.3}, {"answer": "red", "score": 0.9}, {"answer": "blue", "score": 0.6}]
    lines = [
        {"id": "raw", "input_ids": [7, 8], "img_fname": "im0.npz", "answers": [{"answer": a} for a in raw]},
        {"id": "scored", "input_ids": [7], "img_fname": "im0.npz", "answers": scored},
    ]
    a2l = {"red": 0, "green": 1, "blue": 2}
    stats = convert_texts("vqa", _write_jsonl(tmp_path / "q.jsonl", lines), tmp_path / "txt", meta=META, ans2label=a2l)
    assert stats["unknown_answers"] == 1  # maroon
    txt = TxtTokLmdb(tmp_path / "txt", -1)
    assert txt["raw"]["target"] == {"labels": [0, 1, 2], "scores": [1.0, 0.9, 0.3]}
    assert txt["scored"]["target"] == {"labels": [0, 2], "scores": [0.9, 0.6]}
    mixed = [{**lines[0], "answers": [{"answer": "red"}, {"answer": "green", "score": 1.0}]}]
    with pytest.raises(DataFormatError, match="some vqa answers have a 'score' and some do not"):
        convert_texts("vqa", _write_jsonl(tmp_path / "m.jsonl", mixed), tmp_path / "txt2", meta=META, ans2label=a2l)


# -- referring expressions: the image size (images.json width / height) ---------------------------------------
# boxes as [x, y, w, h] pixels on a 320 x 240 image (and 200 x 100), exact in the float16 the img_db stores
RE_SIZES = {0: (320, 240), 1: (200, 100)}
RE_BOXES = {0: [[0, 0, 160, 120], [80, 60, 160, 120], [160, 0, 160, 240]], 1: [[0, 0, 100, 50], [100, 50, 100, 50]]}


def _re_npz_dir(path, extra: dict | None = None):
    path.mkdir()
    rng = np.random.default_rng(0)
    for k, boxes in RE_BOXES.items():
        w, h = RE_SIZES[k]
        b = np.asarray(boxes, dtype=np.float64)
        x1, y1, bw, bh = b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h
        norm_bb = np.stack([x1, y1, x1 + bw, y1 + bh, bw, bh], axis=1).astype(np.float32)
        n = len(boxes)
        np.savez(path / f"visual_grounding_coco_gt_{k:012}.npz", features=rng.normal(size=(n, D)).astype(np.float32),
                 norm_bb=norm_bb, conf=np.linspace(0.9, 0.5, n).astype(np.float32), **(extra or {}))  # fmt: skip


def _re_example(i: int, image_id: int, **size) -> dict:
    n = len(RE_BOXES[image_id])
    return {"id": str(i), "input_ids": [5 + i, 6], "img_fname": f"visual_grounding_coco_gt_{image_id:012}.npz",
            "image_id": image_id, "ann_id": 10 * image_id + i % n, "ann_ids": [10 * image_id + j for j in range(n)],
            "bbox": RE_BOXES[image_id][i % n], **size}  # fmt: skip


def _write_jsonl(path, examples) -> str:
    path.write_text("\n".join(json.dumps(x) for x in examples))
    return str(path)


def test_convert_re_writes_image_size_and_the_reader_uses_it(tmp_path):
    from villa_fast.data import ReEvalDataset, ReTxtTokLmdb, re_eval_collate

    _re_npz_dir(tmp_path / "npz")
    img_db = tmp_path / "re_coco_gt"
    assert convert_main(["img", "--npz-dir", str(tmp_path / "npz"), "--output", str(img_db), "--conf-th", "-1",
                         "--num-bb", "100", "--no-compress"]) == 0  # fmt: skip
    examples = [
        _re_example(0, 0, width=320, height=240),  # COCO's names
        _re_example(1, 0),  # no size here: the image's other examples give it
        _re_example(2, 1, image_w=200, image_h=100),  # a detector's names
        _re_example(3, 1, image_w=200.0, image_h=100.0, width=200, height=100),  # both, agreeing
    ]
    jsonl = _write_jsonl(tmp_path / "re.jsonl", examples)
    assert convert_texts("re", jsonl, tmp_path / "txt", meta=META)["written"] == 4
    images = json.loads((tmp_path / "txt" / "images.json").read_text())
    assert images == [
        {"id": 0, "ann_ids": [0, 1, 2], "width": 320, "height": 240},
        {"id": 1, "ann_ids": [10, 11], "width": 200, "height": 100},
    ]
    txt = ReTxtTokLmdb(tmp_path / "txt", -1)
    assert txt["2"]["image_w"] == 200 and "width" not in txt["2"]  # records keep their input fields
    ds = ReEvalDataset(txt, DetectFeatLmdb(img_db, conf_th=-1, num_bb=100, compress=False))
    batch = re_eval_collate([ds[i] for i in range(4)])
    for i, ex in enumerate(examples):
        n = len(RE_BOXES[ex["image_id"]])
        torch.testing.assert_close(
            batch["obj_boxes"][i, :n], torch.tensor(RE_BOXES[ex["image_id"]], dtype=torch.float64)
        )
        assert batch["obj_boxes"][i, n:].isnan().all()
        torch.testing.assert_close(batch["tgt_box"][i], torch.tensor(ex["bbox"], dtype=torch.float64))


def _re_txt_db(path, images: list[dict], records: list[dict]) -> str:
    from villa_fast.data import TxtDbWriter

    with TxtDbWriter(path, dict(META)) as w:
        for rec in records:
            w.add(rec["id"], rec)
        w.extra_json["images.json"] = images
    return str(path)


def test_re_reader_takes_the_size_pair_from_images_json_else_from_the_record(tmp_path):
    from villa_fast.data import ReEvalDataset, ReTxtTokLmdb

    _re_npz_dir(tmp_path / "npz")
    convert_main(["img", "--npz-dir", str(tmp_path / "npz"), "--output", str(tmp_path / "img"), "--conf-th", "-1",
                  "--num-bb", "100"])  # fmt: skip
    img = DetectFeatLmdb(tmp_path / "img", conf_th=-1, num_bb=100)
    images = [{"id": 0, "ann_ids": [0, 1, 2], "width": 320, "height": 240}, {"id": 1, "ann_ids": [10, 11]}]
    records = [
        _re_example(0, 0, width=999, height=999),  # images.json has the size: the record's is not read
        _re_example(1, 1, width=200, height=100),  # images.json has none: the record's pair
        _re_example(2, 1),  # nowhere: no boxes in pixels
    ]
    ds = ReEvalDataset(ReTxtTokLmdb(_re_txt_db(tmp_path / "txt", images, records), -1), img)
    torch.testing.assert_close(ds[0][7], torch.tensor(RE_BOXES[0], dtype=torch.float64))
    torch.testing.assert_close(ds[1][7], torch.tensor(RE_BOXES[1], dtype=torch.float64))
    assert ds[2][7] is None
    # never one value from each: half a size in images.json is an error when the db opens
    half = [{"id": 0, "ann_ids": [0, 1, 2], "width": 320}, images[1]]
    with pytest.raises(DataFormatError, match=r"images.json image 0: has 'width' but no 'height'"):
        ReTxtTokLmdb(_re_txt_db(tmp_path / "txt_half", half, records[:1]), -1)
    # ... and in a record, when the item is read
    ds = ReEvalDataset(ReTxtTokLmdb(_re_txt_db(tmp_path / "txt_rec", images, [_re_example(0, 1, height=100)]), -1), img)
    with pytest.raises(DataFormatError, match=r"key '0': has 'height' but no 'width'"):
        ds[0]


@pytest.mark.parametrize("bad", [0, -320, "320", True, float("inf")])
def test_re_image_size_must_be_positive_pixels(tmp_path, bad):
    from villa_fast.data import ReTxtTokLmdb

    images = [{"id": 0, "ann_ids": [0, 1, 2], "width": bad, "height": 240}]
    path = _re_txt_db(tmp_path / "txt", images, [_re_example(0, 0)])
    with pytest.raises(DataFormatError, match=r"images.json image 0: 'width' must be a positive number"):
        ReTxtTokLmdb(path, -1)
    jsonl = _write_jsonl(tmp_path / "re.jsonl", [_re_example(0, 0, width=bad, height=240)])
    with pytest.raises(DataFormatError, match=r"re.jsonl:1: 'width' must be a positive number"):
        convert_texts("re", jsonl, tmp_path / "out", meta=META)


@pytest.mark.parametrize(
    "examples, message",
    [
        ([_re_example(0, 0, width=320)], r"re.jsonl:1: has 'width' but no 'height'"),
        ([_re_example(0, 0, image_h=240)], r"re.jsonl:1: has 'image_h' but no 'image_w'"),
        (
            [_re_example(0, 0, width=320, height=240, image_w=321, image_h=240)],
            r"re.jsonl:1: the image size keys disagree",
        ),
        (
            [_re_example(0, 0, width=320, height=240), _re_example(1, 1), _re_example(2, 0, width=240, height=320)],
            r"re.jsonl:3: image 0 is 240 x 320 pixels here but 320 x 240 in an earlier example",
        ),
        (
            [_re_example(0, 0), {**_re_example(1, 0), "ann_ids": list(reversed(_re_example(1, 0)["ann_ids"]))}],
            r"re.jsonl:2: image 0 lists ann_ids \[2, 1, 0\] here but \[0, 1, 2\] in an earlier example",
        ),
    ],
    ids=["half", "half-detector-names", "pairs-disagree", "examples-disagree", "ann-ids-disagree"],
)
def test_convert_re_rejects_inconsistent_images(tmp_path, examples, message):
    jsonl = _write_jsonl(tmp_path / "re.jsonl", examples)
    with pytest.raises(DataFormatError, match=message):
        convert_texts("re", jsonl, tmp_path / "txt", meta=META)


def test_convert_img_refuses_image_sizes_in_npz_and_says_where_they_go(tmp_path):
    _re_npz_dir(tmp_path / "npz", extra={"image_w": np.array(320), "image_h": np.array(240)})
    with pytest.raises(DataFormatError, match=r"unknown arrays \['image_h', 'image_w'\].*--task re.*images.json"):
        convert_main(["img", "--npz-dir", str(tmp_path / "npz"), "--output", str(tmp_path / "img")])


# -- VCR: the official length convention and the padded text bound it allows --------------------------------------


def test_vcr_lengths_follow_the_official_convention_and_bound_the_padded_text(tmp_path):
    from tests.test_train_fixtures import build_task_data
    from villa_fast.data import VcrDataset, VcrEvalDataset, VcrTxtTokLmdb
    from villa_fast.data.pretrain import MlmDatasetForVcr

    data = build_task_data(tmp_path / "fixture", "vcr", n_txt=8, n_img=4)
    gt_dir, det_dir = data["img_db"].split(";")
    gt = DetectFeatLmdb(gt_dir, -1, 100, 10, 100, False)
    det = DetectFeatLmdb(det_dir, 0.2, 6, 2, 36, False)
    rng = np.random.default_rng(0)

    def ids(lo, hi):
        return [int(x) for x in rng.integers(5, 40, int(rng.integers(lo, hi)))]

    examples = [
        {
            "id": f"val-{i}",
            "img_fname": [f"img_{i % 4:03d}.npz", f"img_{i % 4:03d}.npz"],
            "input_ids": ids(3, 12),
            "answers": [ids(1, 9) for _ in range(4)],
            "rationales": [ids(1, 15) for _ in range(4)],
            "answer_label": int(rng.integers(4)),
            "rationale_label": int(rng.integers(4)),
        }
        for i in range(40)
    ]
    jsonl = _write_jsonl(tmp_path / "vcr.jsonl", examples)
    assert convert_texts("vcr", jsonl, tmp_path / "txt", meta=META)["written"] == 40
    qa_db = VcrTxtTokLmdb(tmp_path / "txt", -1, task="qa")
    qar_db = VcrTxtTokLmdb(tmp_path / "txt", -1, task="qar")
    for ex in examples:
        base = len(ex["input_ids"]) + max(map(len, ex["answers"]))
        assert qa_db.id2len[ex["id"]] == 4 * base  # the four Q->A rows priced together
        assert qar_db.id2len[ex["id"]] == 4 * base + max(map(len, ex["rationales"]))
    # the padded text bound is the longest row each example can make, not the priced length; the price of an
    # example in a fixed-shape batch stays the authors' batching length
    for task, db in (("qa", qa_db), ("qar", qar_db)):
        ds = VcrDataset(db, gt, det)
        for i, id_ in enumerate(ds.ids):
            ex = examples[int(id_.split("-")[1])]
            q, a = len(ex["input_ids"]), max(map(len, ex["answers"]))
            want = q + a + 3 if task == "qa" else q + a + max(map(len, ex["rationales"])) + 4
            assert ds.pad_dims[i][0] == want
            assert ds.lens[i] == db.id2len[id_] + ds.pad_dims[i][1]  # the authors' batching length
            assert ds.pad_prices[i] == ds.lens[i]
            assert max(row[0].numel() for row in ds[i]) <= want
    eval_ds = VcrEvalDataset("test", VcrTxtTokLmdb(tmp_path / "txt", -1, task="qa,qar"), gt, det)
    pre = MlmDatasetForVcr(qar_db, gt, det)
    for i in range(len(eval_ds)):
        assert max(row[0].numel() for row in eval_ds[i][0]) <= eval_ds.pad_dims[i][0]
        assert pre[i][0].numel() <= pre.pad_dims[i][0]
    # lengths of another convention (q + the longest answer, unpriced): the bound falls back to id2len + 3
    import shutil

    shutil.copytree(tmp_path / "txt", tmp_path / "txt_other")
    plain = {ex["id"]: len(ex["input_ids"]) + max(map(len, ex["answers"])) for ex in examples}
    (tmp_path / "txt_other" / "id2len_qa.json").write_text(json.dumps(plain))
    other = VcrDataset(VcrTxtTokLmdb(tmp_path / "txt_other", -1, task="qa"), gt, det)
    assert all(d[0] == plain[id_] + 3 for d, id_ in zip(other.pad_dims, other.ids, strict=True))
    assert all(max(row[0].numel() for row in other[i]) <= other.pad_dims[i][0] for i in range(len(other)))


def test_region_counts_of_a_fixed_count_db_are_the_records_own_and_cached(tmp_path, monkeypatch):
    """A ``conf_th == -1`` db lists ``num_bb`` for every image (the authors' price); ``region_counts`` reads the
    records' own counts once and keeps them in the cache folder, which a changed database invalidates."""
    from tests.test_train_fixtures import build_task_data
    from villa_fast.data import VcrDataset, VcrTxtTokLmdb

    data = build_task_data(tmp_path / "fixture", "vcr", n_txt=8, n_img=4)
    gt_dir, det_dir = data["img_db"].split(";")
    monkeypatch.setenv("VILLA_FAST_CACHE", str(tmp_path / "cache"))
    gt = DetectFeatLmdb(gt_dir, -1, 100, 10, 100, False)
    assert set(gt.name2nbb.values()) == {100}
    counts = gt.region_counts()
    assert counts == {name: gt[name][0].size(0) for name in gt.name2nbb}
    assert max(counts.values()) < 100
    cached = list((tmp_path / "cache" / "region_counts").glob("*.json"))
    assert len(cached) == 1
    # a second db object reads the cache, not the records
    again = DetectFeatLmdb(gt_dir, -1, 100, 10, 100, False)
    monkeypatch.setattr(again, "_load", lambda *a, **k: pytest.fail("records read despite the cache"))
    assert again.region_counts() == counts
    # a corrupt cache file is recounted
    cached[0].write_text("{not json")
    third = DetectFeatLmdb(gt_dir, -1, 100, 10, 100, False)
    assert third.region_counts() == counts
    # a detections db's counts are its name2nbb
    det = DetectFeatLmdb(det_dir, 0.2, 6, 2, 36, False)
    assert det.region_counts() == det.name2nbb
    # the dataset: lens price the listed counts (the authors' batching), pad_dims bound the real ones
    tdb = VcrTxtTokLmdb(data["train_txt_db"], -1, task="qa")
    loose, tight = VcrDataset(tdb, gt, det), VcrDataset(tdb, gt, det, exact_region_counts=True)
    assert tight.lens == loose.lens and tight.pad_prices == loose.pad_prices
    for i in range(len(tight)):
        n_real = tight[i][0][2].size(0)
        assert tight.pad_dims[i][1] == n_real < loose.pad_dims[i][1]
        assert tight.pad_dims[i][0] == loose.pad_dims[i][0]


def test_vcr_texts_in_the_annotation_format_map_person_tags_after_the_vocabulary(tmp_path):
    """VCR annotations give texts as words and object references: a person becomes the tag person_<index>, whose
    id is vocab size + index (the 81 rows VCR models add), another object its name; plain texts' person_<n>
    words are tags too."""
    from villa_fast.data.convert import convert_texts

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", ".", "why", "is", "smiling", "the", "dog", "happy"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(words))
    v = len(words)
    ids = {w: i for i, w in enumerate(words)}
    ex = {
        "id": "a-0",
        "img_fname": ["vcr_gt_val_x.npz", "vcr_val_x.npz"],
        "objects": ["person", "dog", "person"],
        "question": ["why", "is", [0, 2], "smiling", "?"],
        "answers": [["the", [1], "is", "happy", "."], "person_2 is happy .", [7, 8], ["is", [2]]],
        "rationales": [["why", "?"], ["is", [0]], "dog", "."],
        "answer_label": 1,
        "rationale_label": 0,
    }
    (tmp_path / "vcr.jsonl").write_text(json.dumps(ex))
    convert_texts("vcr", tmp_path / "vcr.jsonl", tmp_path / "txt", vocab)
    from villa_fast.data import VcrTxtTokLmdb

    rec = VcrTxtTokLmdb(tmp_path / "txt", -1)["a-0"]  # a VCR reader: its ids reach past the vocabulary
    assert rec["input_ids"] == [ids["why"], ids["is"], v + 0, v + 2, ids["smiling"], ids["?"]]
    assert rec["input_ids_as"] == [
        [ids["the"], ids["dog"], ids["is"], ids["happy"], ids["."]],
        [v + 2, ids["is"], ids["happy"], ids["."]],
        [7, 8],  # ids given as they are
        [ids["is"], v + 2],
    ]
    assert rec["input_ids_rs"][1] == [ids["is"], v + 0]
    with pytest.raises(DataFormatError, match=rf"entry 2 is {v}, not a token id .*0 <= id < {v}"):
        TxtTokLmdb(tmp_path / "txt", -1)["a-0"]  # a reader of other tasks' dbs embeds no person tags
    # a reference past the objects, or a person tag past the 81, is named
    for k, (bad, match) in enumerate(((["is", [5]], "object reference 5"), ("person_81 is", "81 person tags"))):
        (tmp_path / "bad.jsonl").write_text(json.dumps({**ex, "question": bad}))
        with pytest.raises(DataFormatError, match=match):
            convert_texts("vcr", tmp_path / "bad.jsonl", tmp_path / f"bad_txt{k}", vocab)


@pytest.mark.parametrize("written", [True, False], ids=["compressed", "plain"])
def test_an_img_db_opened_with_the_other_compression_names_the_flag(tmp_path, written):
    make_images(tmp_path / "img", n=2, compress=written)
    flag = "--compressed_db" if written else "--no-compressed_db"
    held = "feat_th0\\.2_max8_min3" + ("_compressed" if written else "")
    with pytest.raises(FileNotFoundError, match=rf"holds {held}.*{flag}"):
        DetectFeatLmdb(tmp_path / "img", compress=not written, **IMG_ARGS)


def test_convert_txt_help_lists_every_tasks_fields(capsys):
    with pytest.raises(SystemExit) as exc:
        convert_main(["txt", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for field in ("img_fname", "answers", "rationale_label", "ann_ids", "bbox", "label", "person_<index>"):
        assert field in out, field
