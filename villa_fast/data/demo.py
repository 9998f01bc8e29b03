"""The embedded demo task: synthetic scenes and template questions in the official formats.

Each image is a scene of 3-6 objects with a colour, a shape, a size and a position.  A
region's feature is a fixed random projection of its attributes (one-hot colour, shape,
size, and centre) plus Gaussian noise; its box is the object's real 7-d box.  A few
low-confidence background regions (no colour or shape) are added, so region selection
by ``conf_th / min_bb`` matters.  Questions need both modalities: existence, counting,
the colour or shape of the object directly left/right of another, count comparisons and
sizes.  Answers are a 21-way vocabulary with VQA-style soft-score targets.

Everything is drawn from one seed and written only if missing; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "ANSWERS",
    "DEMO_IMG_DB",
    "build_demo_data",
    "demo_model_config",
    "demo_vocab",
]

COLOURS = ("red", "green", "blue", "yellow", "purple", "grey")
SHAPES = ("cube", "sphere", "cylinder", "cone")
SIZES = ("small", "large")
MAX_OBJECTS = 6
ANSWERS = ("yes", "no", *[str(i) for i in range(MAX_OBJECTS + 1)], *COLOURS, *SHAPES, *SIZES)
IMG_DIM = 128
#: region selection of the demo image database (keyword arguments of DetectFeatLmdb)
DEMO_IMG_DB = {"conf_th": 0.2, "max_bb": 10, "min_bb": 4, "num_bb": 10, "compress": True}
_VERSION = 3
_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORDS = (
    "!", "?", ",", ".",
    "is", "there", "a", "an", "how", "many", "are", "what", "colour", "shape", "size",
    "the", "object", "objects", "left", "right", "of", "directly", "more", "than", "to",
    *COLOURS, *SHAPES, *[s + "s" for s in SHAPES], *SIZES,
)  # fmt: skip


def demo_vocab() -> list[str]:
    """The demo's WordPiece vocabulary (one token per line of ``vocab.txt``)."""
    out: list[str] = []
    for tok in (*_SPECIAL, *_WORDS):
        if tok not in out:
            out.append(tok)
    return out


def demo_model_config() -> dict:
    """The demo's UNITER config (BERT keys): 2 layers of width 64, trained from scratch on a CPU in a minute.

    A model this small trains from scratch, not from a pre-trained checkpoint, so two settings
    differ from BERT's: weights start at N(0, 0.1) (BERT's 0.02 is sized for width 768; at width
    64 it leaves attention nearly uniform and the image path with almost no gradient, so the
    model settles on the text-only answer prior), and there is no dropout (a model this small
    underfits the task).  The answer count is not a model key: it is ``len(ANSWERS)``, the size
    of ``ans2label.json``.
    """
    return {
        "vocab_size": len(demo_vocab()),
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "initializer_range": 0.1,
        "layer_norm_eps": 1e-12,
        "img_dim": IMG_DIM,
    }


# ----------------------------------------------------------------------------- scenes


def _scene(rng: np.random.Generator) -> list[dict]:
    n = int(rng.integers(3, MAX_OBJECTS + 1))
    xs = rng.permutation(np.linspace(0.1, 0.9, 9))[:n] + rng.uniform(-0.03, 0.03, n)
    return [
        {
            "colour": int(rng.integers(len(COLOURS))),
            "shape": int(rng.integers(len(SHAPES))),
            "size": int(rng.integers(2)),
            "x": float(xs[i]),
            "y": float(rng.uniform(0.15, 0.85)),
        }
        for i in range(n)
    ]


def _regions(objs: list[dict], proj: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n_bg = int(rng.integers(1, 4))
    attrs, boxes, conf = [], [], []
    for o in objs:
        a = np.zeros(proj.shape[0], np.float32)
        a[o["colour"]] = 1
        a[len(COLOURS) + o["shape"]] = 1
        a[len(COLOURS) + len(SHAPES) + o["size"]] = 1
        a[-3:] = (o["x"], o["y"], 1.0)
        attrs.append(a)
        half = (0.06 if o["size"] == 0 else 0.12) * float(rng.uniform(0.9, 1.1))
        boxes.append((o["x"] - half, o["y"] - half, o["x"] + half, o["y"] + half))
        conf.append(float(rng.uniform(0.5, 1.0)))
    for _ in range(n_bg):
        a = np.zeros(proj.shape[0], np.float32)
        x, y = rng.uniform(0.1, 0.9, 2)
        a[-3:] = (x, y, 1.0)
        attrs.append(a)
        half = float(rng.uniform(0.05, 0.3))
        boxes.append((x - half, y - half, x + half, y + half))
        conf.append(float(rng.uniform(0.01, 0.19)))
    feats = np.stack(attrs) @ proj + rng.normal(0, 0.1, (len(attrs), proj.shape[1]))
    b = np.clip(np.array(boxes, np.float32), 0.0, 1.0)
    norm_bb = np.concatenate([b, b[:, 2:3] - b[:, 0:1], b[:, 3:4] - b[:, 1:2]], axis=1)
    return {"features": feats.astype(np.float32), "norm_bb": norm_bb, "conf": np.array(conf, np.float32)}


def _plural(shape: int) -> str:
    return SHAPES[shape] + "s"


def _unique(objs, colour, shape) -> list[int]:
    return [k for k, o in enumerate(objs) if o["colour"] == colour and o["shape"] == shape]


def _question(objs: list[dict], rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, answer, question type) for one scene; retries until a template applies."""
    while True:
        kind = int(rng.integers(6))
        if kind == 0:  # existence, balanced yes/no
            if rng.random() < 0.5:
                o = objs[int(rng.integers(len(objs)))]
                c, s = o["colour"], o["shape"]
            else:
                c, s = int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))
            ans = "yes" if _unique(objs, c, s) else "no"
            return f"is there a {COLOURS[c]} {SHAPES[s]} ?", ans, "exist"
        if kind == 1:  # counting
            if rng.random() < 0.5:
                c = int(rng.integers(len(COLOURS)))
                n = sum(o["colour"] == c for o in objs)
                return f"how many {COLOURS[c]} objects are there ?", str(n), "count"
            s = int(rng.integers(len(SHAPES)))
            n = sum(o["shape"] == s for o in objs)
            return f"how many {_plural(s)} are there ?", str(n), "count"
        if kind in (2, 3):  # attribute of the object directly left / right of an anchor
            k = int(rng.integers(len(objs)))
            anchor = objs[k]
            if len(_unique(objs, anchor["colour"], anchor["shape"])) != 1:
                continue
            left = rng.random() < 0.5
            side = [o for o in objs if (o["x"] < anchor["x"]) == left and o is not anchor]
            if not side:
                continue
            near = min(side, key=lambda o: abs(o["x"] - anchor["x"]))
            ref = f"the {COLOURS[anchor['colour']]} {SHAPES[anchor['shape']]}"
            where = "left" if left else "right"
            if kind == 2:
                return f"what colour is the object directly {where} of {ref} ?", COLOURS[near["colour"]], "rel_colour"
            return f"what shape is the object directly {where} of {ref} ?", SHAPES[near["shape"]], "rel_shape"
        if kind == 4:  # comparison of two counts
            c = int(rng.integers(len(COLOURS)))
            s = int(rng.integers(len(SHAPES)))
            nc = sum(o["colour"] == c for o in objs)
            ns = sum(o["shape"] == s for o in objs)
            if rng.random() < 0.5:
                q = f"are there more {COLOURS[c]} objects than {_plural(s)} ?"
                return q, "yes" if nc > ns else "no", "compare"
            q = f"are there more {_plural(s)} than {COLOURS[c]} objects ?"
            return q, "yes" if ns > nc else "no", "compare"
        o = objs[int(rng.integers(len(objs)))]  # size of a uniquely described object
        if len(_unique(objs, o["colour"], o["shape"])) != 1:
            continue
        return f"what size is the {COLOURS[o['colour']]} {SHAPES[o['shape']]} ?", SIZES[o["size"]], "size"


# ----------------------------------------------------------------------------- writer


def _params(seed: int, n_train: int, n_val: int, questions_per_image: int) -> dict:
    return {
        "version": _VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "questions_per_image": questions_per_image,
        "img_dim": IMG_DIM,
        "img_db": DEMO_IMG_DB,
    }


def _paths(root: Path) -> dict:
    return {
        "root": str(root),
        "train_txt_db": str(root / "txt_db" / "train"),
        "val_txt_db": str(root / "txt_db" / "val"),
        "img_db": str(root / "img_db"),
        "vocab": str(root / "vocab.txt"),
        "ans2label": str(root / "ans2label.json"),
        "model_config": str(root / "model_config.json"),
        "img_db_args": dict(DEMO_IMG_DB),
        "img_dim": IMG_DIM,
        "num_answers": len(ANSWERS),
    }


def _write(root: Path, params: dict) -> None:
    from villa_fast.data.db import ImgDbWriter, TxtDbWriter
    from villa_fast.data.tokenizer import WordPieceTokenizer

    seed = params["seed"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(demo_vocab()) + "\n", encoding="utf-8")
    ans2label = {a: i for i, a in enumerate(ANSWERS)}
    (root / "ans2label.json").write_text(json.dumps(ans2label, indent=2), encoding="utf-8")
    (root / "model_config.json").write_text(json.dumps(demo_model_config(), indent=2), encoding="utf-8")
    tok = WordPieceTokenizer(root / "vocab.txt", lowercase=True)

    proj_rng = np.random.default_rng([seed, 0])
    n_attr = len(COLOURS) + len(SHAPES) + len(SIZES) + 3
    proj = proj_rng.normal(0.0, 1.0, (n_attr, IMG_DIM)) / np.sqrt(3.0)

    qpi = params["questions_per_image"]
    img_dir = root / "img_db"
    img_dir.mkdir()
    (img_dir / "meta.json").write_text(json.dumps({"img_dim": IMG_DIM, **DEMO_IMG_DB}, indent=2), encoding="utf-8")
    with ImgDbWriter(img_dir, **DEMO_IMG_DB) as img_w:
        for split_no, (split, n_q) in enumerate((("train", params["n_train"]), ("val", params["n_val"]))):
            rng = np.random.default_rng([seed, 1 + split_no])
            n_img = -(-n_q // qpi)
            meta = {**tok.meta(), "img_dim": IMG_DIM, "num_answers": len(ANSWERS), "task": "vqa", "demo": params}
            meta["vocab_file"] = "vocab.txt"
            records = []
            for k in range(n_img):
                objs = _scene(rng)
                fname = f"demo_{split}_{k:06d}.npz"
                img_w.add(fname, **_regions(objs, proj, rng))
                for _ in range(min(qpi, n_q - k * qpi)):
                    q, a, kind = _question(objs, rng)
                    records.append((fname, q, a, kind))
            ids = tok.encode_batch([r[1] for r in records])
            with TxtDbWriter(root / "txt_db" / split, meta) as txt_w:
                for j, ((fname, q, a, kind), input_ids) in enumerate(zip(records, ids, strict=True)):
                    qid = f"{split}_{j:06d}"
                    rec = {
                        "question_id": qid,
                        "question": q,
                        "answer": a,
                        "qtype": kind,
                        "input_ids": input_ids,
                        "img_fname": fname,
                        "target": {"labels": [ans2label[a]], "scores": [1.0]},
                    }
                    txt_w.add(qid, rec)
                txt_w.extra_json["ans2label.json"] = ans2label


def demo_data_version() -> int:
    """Version of the demo data's generator: data built by another version is not reused."""
    return _VERSION


def _is_demo_tag(text: str) -> bool:
    """Whether a ``DONE`` file's text is one this builder writes (demo data, of any version)."""
    try:
        tag = json.loads(text)
    except ValueError:
        return False
    return isinstance(tag, dict) and {"version", "seed", "n_train", "n_val"} <= tag.keys()


def build_demo_data(
    root: str | Path,
    seed: int = 0,
    n_train: int = 4000,
    n_val: int = 1000,
    questions_per_image: int = 4,
    *,
    rebuild_stale: bool = False,
) -> dict:
    """Write the demo's txt_db (train/val), img_db, vocab, answer map and model config under ``root``.

    Nothing is rewritten when ``root`` already holds data built with the same arguments (a
    ``DONE`` file records them); demo data built with other arguments or by another version of this
    builder is replaced with ``rebuild_stale`` (the demo's own data directory), else raises
    ``FileExistsError``, as any other contents do.  Building goes to a
    temporary sibling directory renamed into place, so an interrupted build leaves nothing
    half-written.  Returns the paths (``train_txt_db``, ``val_txt_db``, ``img_db``, ``vocab``,
    ``ans2label``, ``model_config``) and ``img_db_args`` (the DetectFeatLmdb keyword
    arguments), ``img_dim`` and ``num_answers``.
    """
    root = Path(root)
    params = _params(int(seed), int(n_train), int(n_val), int(questions_per_image))
    tag = json.dumps(params, sort_keys=True)
    done = root / "DONE"
    if done.is_file():
        if done.read_text(encoding="utf-8") == tag:
            return _paths(root)
        if not (rebuild_stale and _is_demo_tag(done.read_text(encoding="utf-8"))):
            raise FileExistsError(f"{root} holds demo data built with other settings; remove it or pick another root")
        shutil.rmtree(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists, is not empty and holds no finished demo data")
    root.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha1(tag.encode()).hexdigest()[:8]
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.{digest}.", dir=root.parent))
    try:
        _write(tmp, params)
        (tmp / "DONE").write_text(tag, encoding="utf-8")
        if root.exists():
            root.rmdir()
        try:
            os.replace(tmp, root)
        except OSError:
            # another process finished first: keep its copy if it is the same build
            if not (done.is_file() and done.read_text(encoding="utf-8") == tag):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _paths(root)
