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

from tests.test_data_helpers import IMG_ARGS, D, make_images, make_txt
from villa_fast.data import DataFormatError, DetectFeatLmdb, TxtTokLmdb, VqaDataset, build_dataloader, vqa_collate
from villa_fast.data.codec import decode_img_record, decode_txt_record, encode_img_record, encode_txt_record
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
        order = np.argsort(-arrays["conf"], kind="stable")
        nbb = min(compute_num_bb(arrays["conf"], 0.2, IMG_ARGS["min_bb"], IMG_ARGS["max_bb"]), len(order))
        assert db.name2nbb[name] == nbb
        feat, bb = db[name]
        assert feat.dtype == torch.float32 and bb.dtype == torch.float32
        assert feat.shape == (nbb, D) and bb.shape == (nbb, 6)
        want = arrays["features"][order[:nbb]].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(feat.numpy(), want)
        dump = db.get_dump(name)
        assert dump["soft_labels"].dtype == np.float32 and dump["soft_labels"].shape[0] == nbb
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
    with pytest.raises(KeyError, match="ghost.npz"):
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
