"""Readers and writers of the official ``txt_db`` and ``img_db`` LMDB directories.

The reader classes keep the authors' names and signatures (``TxtLmdb``,
``TxtTokLmdb``, ``DetectFeatLmdb``), so code written against their data modules
ports by changing the import.  Databases are opened read-only without locks, once per
path and process, and each process (a DataLoader worker included) reads through a
transaction of its own, never one begun by its parent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch

from villa_fast.data.codec import (
    DataFormatError,
    decode_img_record,
    decode_txt_record,
    encode_img_record,
    encode_txt_record,
)

__all__ = [
    "CONVERTER_MARK",
    "IMG_KEYS",
    "VCR_PERSON_TAGS",
    "DetectFeatLmdb",
    "ImgDbWriter",
    "TxtDbWriter",
    "TxtLmdb",
    "TxtTokLmdb",
    "check_txt_record",
    "compute_num_bb",
    "img_db_name",
    "load_counts",
    "load_json",
    "nbb_file_name",
    "open_lmdb",
    "written_by_converter",
]

logger = logging.getLogger(__name__)

#: keys an image record may hold (a detector's ``.npz`` output)
IMG_KEYS = frozenset({"features", "norm_bb", "conf", "soft_labels"})
_KEYS_KEY = b"__keys__"
#: a member of the compressed records the authors' conversion script writes under numpy < 2.1: it passed
#: ``allow_pickle=True`` to ``np.savez_compressed``, which took the keyword for one more array to store (a 0-d
#: bool); it is no data and is dropped when such a record is read
_NPZ_STRAY_MEMBER = "allow_pickle"
#: VCR's person tags: ``person_<n>`` takes the token id ``vocab size + n``, n < 81 (the rows VCR models add after
#: the vocabulary), so a VCR txt_db's ids reach ``v_range[1] + 81``
VCR_PERSON_TAGS = 81
#: what this package's converter adds to a txt_db's ``meta.json``: only there does its ``task`` name one of this
#: package's tasks (the official databases' ``meta.json`` holds the options of the authors' preprocessing, whose
#: ``task`` values follow names of their own, "nlvr" for NLVR2)
CONVERTER_MARK = {"written_by": "villa_fast"}


def written_by_converter(meta: Any) -> bool:
    """Whether a txt_db's ``meta.json`` content carries :data:`CONVERTER_MARK`."""
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in CONVERTER_MARK.items())


def load_json(path: str | Path, what: str = "side file") -> Any:
    """``json.load`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {what}: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: not valid JSON ({exc})") from exc


def load_counts(path: str | Path, what: str) -> dict[str, int]:
    """A JSON map of names to counts (``id2len.json``, ``nbb_*.json``), each value checked once here to be an
    integer >= 0 (JSON ``true`` and ``5.0`` are not): a :class:`DataFormatError` names the file and the key."""
    path = Path(path)
    obj = load_json(path, what)
    if not isinstance(obj, dict):
        raise DataFormatError(f"{path}: must map names to counts, found a {type(obj).__name__}")
    bad = next((k for k, v in obj.items() if type(v) is not int or v < 0), None)
    if bad is not None:
        v = obj[bad]
        raise DataFormatError(f"{path}: key {bad!r} holds {v!r} ({type(v).__name__}), not a count (an integer >= 0)")
    return obj


def _check_meta(meta: Any, path: Path) -> None:
    """The ``meta.json`` fields the readers use: CLS / SEP / MASK token ids and ``v_range``, two ids first < end."""
    if not isinstance(meta, dict):
        raise DataFormatError(f"{path}: must be a JSON object, found a {type(meta).__name__}")
    for key in ("CLS", "SEP", "MASK", "v_range"):
        if key not in meta:
            raise DataFormatError(f"{path}: missing key {key!r}")
    for key in ("CLS", "SEP", "MASK"):
        v = meta[key]
        if type(v) is not int or v < 0:
            raise DataFormatError(f"{path}: key {key!r} is {v!r} ({type(v).__name__}), not a token id (an int >= 0)")
    vr = meta["v_range"]
    if not (isinstance(vr, list) and len(vr) == 2 and all(type(x) is int for x in vr) and 0 <= vr[0] < vr[1]):
        raise DataFormatError(
            f"{path}: key 'v_range' is {vr!r:.80}, not two token ids [first, end) (integers, 0 <= first < end)"
        )


def _dump_json(obj: Any, path: Path, indent: int | None = None) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=indent, sort_keys=indent is not None)


def compute_num_bb(confs: np.ndarray, conf_th: float, min_bb: int, max_bb: int) -> int:
    """Regions kept for one image: ``clip(#(conf > conf_th), min_bb, max_bb)``."""
    return int(min(max_bb, max(min_bb, int((np.asarray(confs) > conf_th).sum()))))


def img_db_name(conf_th: float, max_bb: int, min_bb: int, num_bb: int, compress: bool) -> str:
    """LMDB sub-directory name the authors' scripts use for these selection settings."""
    name = f"feat_numbb{num_bb}" if conf_th == -1 else f"feat_th{conf_th}_max{max_bb}_min{min_bb}"
    return name + "_compressed" if compress else name


def nbb_file_name(conf_th: float, max_bb: int, min_bb: int) -> str:
    return f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json"


# (pid, path, inode, device) -> (environment, read transaction), shared by every reader of a path in a process
_OPEN_ENVS: dict[tuple, tuple] = {}


def _open_for_reading(path: str, readahead: bool):
    """A read-only, lock-free LMDB environment of ``path``, refused when its ``data.mdb`` is shorter than the pages
    its meta page says are in use.

    LMDB maps the file into memory and trusts it: a read of a page past a truncated file's end (an interrupted copy
    or download) kills the process with SIGBUS, which no handler can report. Opening reads only the two meta pages
    at the start of the file, so the length is compared before any other page is touched."""
    data = os.path.join(path, "data.mdb")
    try:
        env = lmdb.open(path, readonly=True, create=False, lock=False, readahead=readahead, max_readers=2048)
    except lmdb.Error as exc:
        raise DataFormatError(f"{path}: not a readable LMDB database ({type(exc).__name__}: {exc})") from exc
    try:
        need = (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])
        size = os.path.getsize(data)
    except Exception:
        env.close()
        raise
    if size < need:
        env.close()
        raise DataFormatError(
            f"{data}: truncated: the file has {size} bytes but its pages in use end at byte {need} "
            "(an interrupted copy or download?)"
        )
    return env


class _LazyEnv:
    """A read-only LMDB environment opened on first use in each process.

    ``readahead`` (default: on in a single process, off when ``WORLD_SIZE`` > 1, as the authors' readers
    open their databases): with several processes reading random records of one database, the OS's
    read-ahead fills the page cache with pages no one asked for."""

    def __init__(self, path: str, readahead: bool | None = None):
        if readahead is None:
            readahead = int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1
        if not os.path.isdir(path):
            other = path[: -len("_compressed")] if path.endswith("_compressed") else path + "_compressed"
            hint = ""
            if os.path.isdir(other):
                flag = "--no-compressed_db" if path.endswith("_compressed") else "--compressed_db"
                hint = f" (the img_db holds {os.path.basename(other)}: set compressed_db accordingly, {flag})"
            raise FileNotFoundError(f"missing LMDB directory: {path}{hint}")
        if not os.path.isfile(os.path.join(path, "data.mdb")):
            raise FileNotFoundError(f"not an LMDB directory (no data.mdb): {path}")
        self.path = os.path.realpath(path)
        self.readahead = readahead
        self._pid: int | None = None
        self._env = None
        self._txn = None

    def txn(self):
        pid = os.getpid()
        if self._pid != pid:
            # one read transaction per process (a parent's is never reused after fork)
            st = os.stat(os.path.join(self.path, "data.mdb"))
            ident = (self.path, st.st_ino, st.st_dev)
            entry = _OPEN_ENVS.get((pid, *ident))
            if entry is None:
                inherited = next((e for k, e in _OPEN_ENVS.items() if k[1:] == ident), None)
                if inherited is not None:
                    # py-lmdb refuses a second handle on a path opened before fork; the inherited
                    # lock-free read-only handle is safe with a transaction of this process's own
                    env = inherited[0]
                else:
                    env = _open_for_reading(self.path, self.readahead)
                entry = (env, env.begin(buffers=True))
                _OPEN_ENVS[(pid, *ident)] = entry
            self._env, self._txn = entry
            self._pid = pid
        return self._txn

    def get(self, key: bytes):
        return self.txn().get(key)

    def keys(self) -> list[bytes]:
        with self.txn().cursor() as cur:
            return [bytes(k) for k in cur.iternext(keys=True, values=False)]

    def close(self) -> None:
        """Forget this handle (the shared environment stays open for other readers of the path)."""
        self._env = self._txn = None
        self._pid = None

    def __getstate__(self):
        return {"path": self.path, "readahead": self.readahead}

    def __setstate__(self, state):
        self.__init__(state["path"], state["readahead"])


class TxtLmdb:
    """Key -> record store of a ``txt_db`` (read-only, or writable for preprocessing)."""

    def __init__(self, db_dir: str | Path, readonly: bool = True):
        self.db_dir = str(db_dir)
        self.readonly = readonly
        if readonly:
            self._env = _LazyEnv(self.db_dir)
        else:
            os.makedirs(self.db_dir, exist_ok=True)
            self.env = lmdb.open(self.db_dir, readonly=False, create=True, map_size=1 << 40, subdir=True)
            self.txn = self.env.begin(write=True)
            self.write_cnt = 0

    def __getitem__(self, key: str) -> dict:
        raw = self._env.get(key.encode("utf-8"))
        if raw is None:
            raise KeyError(f"{self.db_dir}: no text record with key {key!r}")
        return decode_txt_record(raw, where=f"{self.db_dir} key {key!r}")

    def __contains__(self, key: str) -> bool:
        return self._env.get(key.encode("utf-8")) is not None

    def __setitem__(self, key: str, value: dict) -> None:
        if self.readonly:
            raise ValueError(f"{self.db_dir}: text DB opened read-only")
        self.txn.put(key.encode("utf-8"), encode_txt_record(value))
        self.write_cnt += 1
        if self.write_cnt % 1000 == 0:
            self.txn.commit()
            self.txn = self.env.begin(write=True)

    def keys(self) -> list[str]:
        return [k.decode("utf-8") for k in self._env.keys()]

    def close(self) -> None:
        if self.readonly:
            self._env.close()
        elif self.txn is not None:
            self.txn.commit()
            self.txn = None
            self.env.close()


class open_lmdb:  # noqa: N801 - the authors' name
    """Context manager around a writable :class:`TxtLmdb`."""

    def __init__(self, db_dir: str | Path, readonly: bool = False):
        self.db = TxtLmdb(db_dir, readonly)

    def __enter__(self) -> TxtLmdb:
        return self.db

    def __exit__(self, *exc) -> None:
        self.db.close()


def _token_ids(value: Any, bound: int | None) -> tuple[Any, str | None]:
    """``value`` as token ids and why it is not a sequence of ids in ``[0, bound)`` (``None`` when it is one;
    ``bound`` None: no upper bound). numpy integer scalars become ints (msgpack-numpy packs them, and the authors'
    reader takes them). Cost: a type test per id, a min and a max."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "iu":
            return value, f"a numpy array of dtype {value.dtype} and shape {value.shape}, not a 1-d integer array"
        if not value.size:
            return value, None
        lo, hi = int(value.min()), int(value.max())
    elif isinstance(value, list | tuple):
        if not all(type(tok) is int for tok in value):
            ids = []
            for k, tok in enumerate(value):
                if isinstance(tok, np.integer):
                    tok = int(tok)
                elif type(tok) is not int:
                    return value, f"a list whose entry {k} is {tok!r} ({type(tok).__name__}), not a token id"
                ids.append(tok)
            value = ids
        if not value:
            return value, None
        lo, hi = min(value), max(value)
    else:
        return value, f"a {type(value).__name__}, not a list of token ids"
    if lo < 0 or (bound is not None and hi >= bound):
        k = next(k for k, tok in enumerate(value) if tok < 0 or (bound is not None and tok >= bound))
        span = "ids are >= 0" if bound is None else f"0 <= id < {bound}, from meta.json v_range"
        return value, f"a sequence whose entry {k} is {int(value[k])}, not a token id of the database ({span})"
    return value, None


def _numbers(value: Any, kind: str) -> tuple[Any, str | None]:
    """``value`` as a 1-d list (or array) of numbers of ``kind`` (numpy kind letters), all finite, and why it is
    not one (``None`` when it is). numpy scalars become ints / floats."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in kind:
            return value, f"an array of dtype {value.dtype} and shape {value.shape}"
        if value.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(value))
            if bad.size:
                return value, f"an array whose entry {int(bad[0])} is {value[bad[0]].item()!r} (not a finite number)"
        return value, None
    if not isinstance(value, list | tuple):
        return value, f"a {type(value).__name__}, not a list"
    floats = kind != "iu"
    out = []
    for k, v in enumerate(value):
        if isinstance(v, np.integer):
            v = int(v)
        elif floats and isinstance(v, np.floating):
            v = float(v)
        if isinstance(v, bool) or not isinstance(v, (int, float) if floats else int):
            return value, f"a list whose entry {k} is {v!r} ({type(v).__name__})"
        if isinstance(v, float) and not math.isfinite(v):
            return value, f"a list whose entry {k} is {v!r} (not a finite number)"
        out.append(v)
    return out, None


def check_txt_record(record: dict, where: str, vocab_end: int | None = None) -> dict:
    """Check the fields every reader of a text record relies on; ``where`` (database and key) leads the
    :class:`DataFormatError` that names what is wrong.

    ``input_ids`` must be a list of token ids, each ``>= 0`` and below ``vocab_end`` (when given: the database's
    ``v_range`` end, plus VCR's person tags for a VCR db); ``target``, when present, a map of parallel ``labels``
    and ``scores`` lists (VQA / SNLI-VE soft targets; the scores finite numbers), an integer (NLVR2's 0 / 1) or
    nil (NLVR2's unlabelled test records); VCR's ``input_ids_as`` / ``input_ids_rs``, when present, lists of
    token-id lists under the same bound. numpy integer and float scalars (msgpack-numpy's encoding of them) are
    taken and replaced, in the record, by ints and floats. Cost: one pass over the record's ids, a min and a max.
    """
    if "input_ids" not in record:
        raise DataFormatError(f"{where}: no 'input_ids' (the record holds {sorted(map(str, record))})")
    ids, problem = _token_ids(record["input_ids"], vocab_end)
    if problem is not None:
        raise DataFormatError(f"{where}: 'input_ids' is {problem}")
    record["input_ids"] = ids
    for key in ("input_ids_as", "input_ids_rs"):
        if key not in record:
            continue
        choices = record[key]
        if not isinstance(choices, list | tuple):
            raise DataFormatError(f"{where}: {key!r} is a {type(choices).__name__}, not a list of candidates")
        checked = []
        for k, ids in enumerate(choices):
            ids, problem = _token_ids(ids, vocab_end)
            if problem is not None:
                raise DataFormatError(f"{where}: {key!r} candidate {k} is {problem}")
            checked.append(ids)
        record[key] = checked
    if "target" in record:
        target = record["target"]
        if isinstance(target, np.integer):
            target = record["target"] = int(target)
        if isinstance(target, dict):
            lens = {}
            for name, kind in (("labels", "iu"), ("scores", "iuf")):
                value, problem = _numbers(target.get(name, []), kind)
                if problem is not None:
                    raise DataFormatError(f"{where}: target {name!r} is {problem}")
                if name in target:
                    target[name] = value
                lens[name] = len(value)
            if lens["labels"] != lens["scores"]:
                raise DataFormatError(
                    f"{where}: target has {lens['labels']} labels but {lens['scores']} scores (one score per label)"
                )
        elif target is not None and not isinstance(target, int):
            raise DataFormatError(
                f"{where}: 'target' is a {type(target).__name__}: expected a map of labels and scores "
                "(soft targets), an integer label or nil (no label)"
            )
    return record


class TxtTokLmdb:
    """A tokenised ``txt_db``: records plus ``meta.json``, ``id2len.json`` and the txt/img maps.

    Examples longer than ``max_txt_len`` (``-1``: no limit) are left out of ``id2len``; how
    many is logged and kept in ``num_too_long``.  ``meta.json``'s token ids and ``id2len.json``'s
    lengths are checked when the db is opened; every record read is checked by
    :func:`check_txt_record` (its token ids below ``vocab_end``) and, where ``id2len`` holds token
    counts, against its length, so a malformed one stops the run with an error naming the
    database, the key and the field.
    """

    id2len_name = "id2len.json"
    #: token ids a db of this kind holds past its vocabulary (``v_range``'s end): VCR's person tags
    ids_past_vocab = 0
    #: ``id2len`` gives each record's ``input_ids`` length (VCR's lengths price a question's rows instead)
    id2len_counts_tokens = True

    def __init__(self, db_dir: str | Path, max_txt_len: int = 60):
        self.db_dir = str(db_dir)
        if not os.path.isdir(self.db_dir):
            raise FileNotFoundError(f"missing txt_db directory: {self.db_dir}")
        meta_path = Path(self.db_dir, "meta.json")
        meta = load_json(meta_path, "txt_db meta.json")
        _check_meta(meta, meta_path)
        self.meta = meta
        self.cls_ = int(meta["CLS"])
        self.sep = int(meta["SEP"])
        self.mask = int(meta["MASK"])
        self.v_range = tuple(meta["v_range"])
        #: token ids of the records are below this
        self.vocab_end = int(self.v_range[1]) + self.ids_past_vocab
        all_lens = load_counts(Path(self.db_dir, self.id2len_name), "txt_db id2len file")
        self.max_txt_len = max_txt_len
        if max_txt_len == -1:
            self.id2len = dict(all_lens)
        else:
            self.id2len = {k: v for k, v in all_lens.items() if v <= max_txt_len}
        self.num_too_long = len(all_lens) - len(self.id2len)
        if self.num_too_long:
            logger.info(
                "%s: skipped %d of %d examples longer than max_txt_len=%d",
                self.db_dir,
                self.num_too_long,
                len(all_lens),
                max_txt_len,
            )
        self.db = TxtLmdb(self.db_dir, readonly=True)
        self._txt2img = None
        self._img2txts = None

    def __getitem__(self, id_: str) -> dict:
        where = f"{self.db_dir} key {id_!r}"
        record = check_txt_record(self.db[id_], where, self.vocab_end)
        if self.id2len_counts_tokens:
            n = self.id2len.get(id_)
            # a record longer than id2len says would pass the max_txt_len filter and overflow the padded shapes
            # computed from id2len; a longer length only pads more
            if n is not None and len(record["input_ids"]) > n:
                raise DataFormatError(
                    f"{where}: 'input_ids' holds {len(record['input_ids'])} tokens but {self.id2len_name} gives "
                    f"{n} (the lengths filter max_txt_len and size the batches)"
                )
        return record

    def combine_inputs(self, *inputs: list[int]) -> torch.Tensor:
        """``[CLS] a [SEP] b [SEP] ...`` as a long tensor."""
        input_ids = [self.cls_]
        for ids in inputs:
            input_ids.extend(list(ids))
            input_ids.append(self.sep)
        return torch.tensor(input_ids, dtype=torch.long)

    @property
    def txt2img(self) -> dict:
        if self._txt2img is None:
            self._txt2img = load_json(Path(self.db_dir, "txt2img.json"), "txt_db txt2img.json")
        return self._txt2img

    @property
    def img2txts(self) -> dict:
        if self._img2txts is None:
            self._img2txts = load_json(Path(self.db_dir, "img2txts.json"), "txt_db img2txts.json")
        return self._img2txts


def _stored_features(feat: np.ndarray) -> np.ndarray:
    """A writable native-order copy of region features: float16 and float32 kept, any other dtype as float32.

    Region features are not widened here: a float16 db's features stay float16 through the collate, the fixed-
    shape padding and the copy to the device, and the model widens them, once, before its image projection."""
    dtype = np.float16 if feat.dtype.kind == "f" and feat.dtype.itemsize == 2 else np.float32
    return np.array(feat, dtype=dtype)  # a copy: a msgpack record's arrays are read-only views of its bytes


def _all_finite(arr: np.ndarray) -> bool:
    """Whether every value of a floating-point array is finite, in one vectorised pass. float16 (the official
    databases' features) is tested on its bits, the magnitude below the all-ones exponent of inf and NaN: about
    20x faster than numpy's float16 ``isfinite`` (0.015 ms for 100 x 2048 values)."""
    if not arr.size:
        return True
    if arr.dtype.kind == "f" and arr.dtype.itemsize == 2:
        bits = arr.view(arr.dtype.str.replace("f", "u"))  # same byte order
        return bool((bits & 0x7FFF).max() < 0x7C00)
    return bool(np.isfinite(arr).all())


class DetectFeatLmdb:
    """Region features of an ``img_db`` directory; ``db[fname] -> (features [n, D], norm_bb [n, 6])``.

    The LMDB used is ``feat_th{conf_th}_max{max_bb}_min{min_bb}[_compressed]`` (or
    ``feat_numbb{num_bb}`` when ``conf_th == -1``) with its ``nbb_*.json`` box counts; when the
    counts file is absent, the ``all[_compressed]`` database is read and counts are computed
    from the confidences (logged).  Region features keep their stored dtype, float16 in the official
    databases (float32 for a db storing float32, any other dtype is widened to float32): the model widens
    them on the device (:class:`~villa_fast.models.UniterImageEmbeddings`), so the loader pads, pins and copies
    half the bytes. Boxes come back as float32.  Records with keys other than :data:`IMG_KEYS` are an error
    unless ``strict=False``.
    """

    def __init__(
        self,
        img_dir: str | Path,
        conf_th: float = 0.2,
        max_bb: int = 100,
        min_bb: int = 10,
        num_bb: int = 36,
        compress: bool = True,
        strict: bool = True,
    ):
        self.img_dir = str(img_dir)
        if not os.path.isdir(self.img_dir):
            raise FileNotFoundError(f"missing img_db directory: {self.img_dir}")
        self.conf_th, self.max_bb, self.min_bb, self.num_bb = conf_th, max_bb, min_bb, num_bb
        self.compress = compress
        self.strict = strict
        db_name = img_db_name(conf_th, max_bb, min_bb, num_bb, compress)
        self.name2nbb: dict[str, int] | None
        if conf_th == -1:
            self.name2nbb = None
            fixed = True
        else:
            fixed = False
            nbb_path = Path(self.img_dir, nbb_file_name(conf_th, max_bb, min_bb))
            self.name2nbb = load_counts(nbb_path, "img_db box counts") if nbb_path.is_file() else None
            if self.name2nbb is None:
                alt = "all_compressed" if compress else "all"
                if os.path.isdir(os.path.join(self.img_dir, alt)):
                    logger.info("%s: no %s; computing box counts from %s", self.img_dir, nbb_path.name, alt)
                    db_name = alt
                else:
                    raise FileNotFoundError(
                        f"missing img_db box counts {nbb_path} (and no '{alt}' database to compute them from)"
                    )
        self.db_path = os.path.join(self.img_dir, db_name)
        self._img_dim: int | None = None
        self._img_dim_from: str | None = None  # the record whose width set it
        self._env = _LazyEnv(self.db_path)
        if fixed:
            self.name2nbb = {name: num_bb for name in self._all_names()}
        elif self.name2nbb is None:
            self.name2nbb = self._compute_nbb()

    def _all_names(self) -> list[str]:
        raw = self._env.get(_KEYS_KEY)
        if raw is not None:
            return list(json.loads(bytes(raw).decode("utf-8")))
        return [k.decode("utf-8") for k in self._env.keys() if k != _KEYS_KEY]

    def _compute_nbb(self) -> dict[str, int]:
        """Box counts from the records' confidences (no ``nbb_*.json``): only ``conf`` is decoded where the
        encoding allows (``.npz`` records; a msgpack record is decoded whole), and the counts are cached as
        :meth:`region_counts`' are, keyed by the database and the selection settings."""
        names = self._all_names()

        def count() -> dict[str, int]:
            out = {}
            for name in names:
                conf = self._load_conf(name)
                out[name] = min(compute_num_bb(conf, self.conf_th, self.min_bb, self.max_bb), len(conf))
            return out

        ident = f"{self._db_ident()}|nbb|{self.conf_th}|{self.max_bb}|{self.min_bb}"
        return self._cached_counts("box_counts", ident, names, count, what="counting the boxes of")

    def _db_ident(self) -> str:
        """The database's path, size and modification time: what a cache of values read from it is keyed by."""
        st = os.stat(os.path.join(self.db_path, "data.mdb"))
        return f"{os.path.realpath(self.db_path)}|{st.st_size}|{st.st_mtime_ns}"

    def _cached_counts(
        self,
        folder: str,
        ident: str,
        names: Iterable[str],
        count: Callable[[], dict[str, int]],
        cache_dir: str | Path | None = None,
        what: str = "counting the regions of",
    ) -> dict[str, int]:
        """Per-image counts read from ``<cache>/<folder>/<hash of ident>.json`` when that file was written for
        ``ident`` and lists exactly ``names``; else ``count()`` (logged), saved there for the next run. The
        cache root is ``cache_dir``, else ``$VILLA_FAST_CACHE``, else ``~/.cache/villa_fast``; a cache that
        cannot be read is recounted, one that cannot be written is logged."""
        names = set(names)
        root = Path(cache_dir or os.environ.get("VILLA_FAST_CACHE") or Path.home() / ".cache" / "villa_fast")
        cache = root / folder / (hashlib.sha256(ident.encode("utf-8")).hexdigest()[:32] + ".json")
        counts = None
        if cache.is_file():
            try:
                saved = json.loads(cache.read_text(encoding="utf-8"))
                if saved.get("db") == ident and isinstance(saved.get("counts"), dict):
                    counts = {str(k): int(v) for k, v in saved["counts"].items()}
            except (OSError, ValueError, TypeError, AttributeError):
                counts = None
        if counts is None or set(counts) != names:
            logger.info("%s: %s %d records (once; cached in %s)", self.img_dir, what, len(names), cache)
            counts = count()
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"db": ident, "counts": counts}), encoding="utf-8")
                os.replace(tmp, cache)
            except OSError as exc:
                logger.warning("%s: could not cache the counts in %s (%s)", self.img_dir, cache, exc)
        return counts

    def region_counts(self, cache_dir: str | Path | None = None) -> dict[str, int]:
        """The regions each image's record gives (``db[name]``'s row count), where ``name2nbb`` only bounds them.

        A ``conf_th == -1`` db (VCR's ground-truth boxes) lists ``num_bb`` for every image, as the authors'
        ``name2nbb``, which prices batches; its records hold their own, usually far fewer, boxes. Counting them
        reads every record once (logged); the counts are kept in ``cache_dir`` (default ``$VILLA_FAST_CACHE``
        or ``~/.cache/villa_fast``), keyed by the database's path, size and modification time, so a later run
        reads a small JSON file. Other dbs' ``name2nbb`` is already exact and is returned as is."""
        if self.conf_th != -1:
            return dict(self.name2nbb)
        if getattr(self, "_region_counts", None) is not None:
            return self._region_counts

        def count() -> dict[str, int]:
            return {
                name: min(int(self._load(name, keys=("features", "norm_bb"), rows=bound)["norm_bb"].shape[0]), bound)
                for name, bound in self.name2nbb.items()
            }

        ident = f"{self._db_ident()}|{self.num_bb}"
        self._region_counts = self._cached_counts("region_counts", ident, self.name2nbb, count, cache_dir)
        return self._region_counts

    def _decode(self, file_name: str, keys: tuple[str, ...] | None = None) -> tuple[dict[str, np.ndarray], str]:
        """The record of ``file_name`` (only ``keys`` parsed where the encoding allows) and where it is."""
        raw = self._env.get(file_name.encode("utf-8"))
        where = f"{self.db_path} key {file_name!r}"
        if raw is None:
            raise KeyError(f"{self.db_path}: no image record with key {file_name!r}")
        dump = decode_img_record(raw, where=where, keys=None if keys is None else (*keys, _NPZ_STRAY_MEMBER))
        stray = dump.get(_NPZ_STRAY_MEMBER)
        if stray is not None and stray.ndim == 0 and stray.dtype == np.bool_:
            del dump[_NPZ_STRAY_MEMBER]
        if self.strict:
            unknown = set(dump) - IMG_KEYS
            if unknown:
                raise DataFormatError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(IMG_KEYS)})")
        return dump, where

    def _load_conf(self, file_name: str) -> np.ndarray:
        """The detection confidences ``[n]`` of a record (to count its boxes), nothing else decoded."""
        dump, where = self._decode(file_name, keys=("conf",))
        conf = dump.get("conf")
        if conf is None:
            raise DataFormatError(
                f"{where}: missing key 'conf' (the box counts are computed from it when "
                f"{nbb_file_name(self.conf_th, self.max_bb, self.min_bb)} is absent)"
            )
        if conf.ndim != 1:
            raise DataFormatError(f"{where}: 'conf' has shape {conf.shape} (want [n])")
        return conf

    def _load(
        self, file_name: str, keys: tuple[str, ...] | None = None, rows: int | None = None
    ) -> dict[str, np.ndarray]:
        """The record of ``file_name`` with its ``features`` and ``norm_bb`` checked: shapes ``[n, D]`` and
        ``[n, 6]``, floating-point, ``D`` the database's :attr:`img_dim`, the first ``rows`` (None: all) of both
        finite (what the model reads: a NaN would spread through the whole batch)."""
        dump, where = self._decode(file_name, keys)
        for key in ("features", "norm_bb"):
            if key not in dump:
                raise DataFormatError(f"{where}: missing key {key!r}")
        feat, bb = dump["features"], dump["norm_bb"]
        if feat.ndim != 2 or bb.ndim != 2 or bb.shape[1] != 6 or bb.shape[0] != feat.shape[0]:
            raise DataFormatError(
                f"{where}: bad shapes features {feat.shape}, norm_bb {bb.shape} (want [n, D], [n, 6])"
            )
        for key, arr in (("features", feat), ("norm_bb", bb)):
            if arr.dtype.kind != "f":
                raise DataFormatError(f"{where}: {key!r} has dtype {arr.dtype}, not a floating-point type")
        width = int(feat.shape[1])
        if self._img_dim is None:
            first = next(iter(self.name2nbb))
            if first != file_name:
                try:
                    self._load(first, keys=("features", "norm_bb"), rows=0)  # sets it
                except KeyError:
                    pass  # the first listed image has no record (a filtered database): this one sets the width
            if self._img_dim is None:
                self._img_dim, self._img_dim_from = width, file_name
        if width != self._img_dim:
            raise DataFormatError(
                f"{where}: 'features' are {width} wide but the database's are {self._img_dim} (img_dim, the width of "
                f"its record {self._img_dim_from!r}): a batch cannot hold both"
            )
        used_feat, used_bb = feat[:rows], bb[:rows]
        if not (_all_finite(used_feat) and _all_finite(used_bb)):
            key, arr = ("features", used_feat) if not _all_finite(used_feat) else ("norm_bb", used_bb)
            idx = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
            raise DataFormatError(f"{where}: {key!r} value at {list(idx)} is {arr[idx].item()!r}, not a finite number")
        return dump

    def __contains__(self, file_name: str) -> bool:
        return file_name in self.name2nbb

    def __len__(self) -> int:
        return len(self.name2nbb)

    def _nbb(self, file_name: str) -> int:
        nbb = self.name2nbb.get(file_name)
        if nbb is None:
            raise KeyError(f"{self.img_dir}: image {file_name!r} is not in the image database")
        return nbb

    def get_dump(self, file_name: str) -> dict[str, np.ndarray]:
        """All arrays of a record (copies), cut to the selected regions: ``features`` as :meth:`__getitem__` gives
        them (their stored float16 kept), float16 ``soft_labels`` kept too (the collate widens the masked rows
        only), other float16 arrays widened to float32."""
        nbb = self._nbb(file_name)
        dump = self._load(file_name, rows=nbb)
        out = {}
        for k, v in dump.items():
            rows = v[:nbb] if v.ndim else v  # a 0-d member (a record read with strict=False) has no regions
            if k == "features":
                out[k] = _stored_features(rows)
            elif v.dtype == np.float16 and k != "soft_labels":
                out[k] = rows.astype(np.float32)
            else:
                out[k] = np.array(rows)
        return out

    def __getitem__(self, file_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [n, D], norm_bb [n, 6])``: features in their stored dtype (see the class), boxes float32."""
        nbb = self._nbb(file_name)
        dump = self._load(file_name, keys=("features", "norm_bb"), rows=nbb)
        feat = torch.from_numpy(_stored_features(dump["features"][:nbb]))
        bb = torch.from_numpy(np.array(dump["norm_bb"][:nbb], dtype=np.float32))  # a copy, as the features
        return feat, bb

    @property
    def img_dim(self) -> int:
        """Width of the region features (2048 for the official databases): the first record's, which every record
        read must share."""
        for name in self.name2nbb:
            if self._img_dim is not None:
                break
            try:
                self._load(name, keys=("features", "norm_bb"), rows=0)  # sets it
            except KeyError:
                continue  # listed without a record: the next one
        if self._img_dim is None:
            raise DataFormatError(f"{self.img_dir}: no image listed in its box counts has a record")
        return self._img_dim


class TxtDbWriter:
    """Writes a ``txt_db``: records, ``meta.json``, ``id2len.json``, ``txt2img.json``, ``img2txts.json``.

    ``add(id_, record)`` takes a record holding ``input_ids`` (without CLS/SEP) and
    ``img_fname`` (a name or a list of names); extra side files (``id2len_qa.json`` for VCR,
    ``images.json`` for referring expressions, ...) go through ``extra_json``.
    """

    def __init__(self, db_dir: str | Path, meta: dict):
        self.db_dir = Path(db_dir)
        if self.db_dir.exists() and any(self.db_dir.iterdir()):
            raise FileExistsError(f"{self.db_dir} exists and is not empty; remove it to re-process")
        for key in ("CLS", "SEP", "MASK", "v_range"):
            if key not in meta:
                raise ValueError(f"txt_db meta is missing {key!r}")
        self.meta = dict(meta)
        self._db = TxtLmdb(self.db_dir, readonly=False)
        self.id2len: dict[str, int] = {}
        self.txt2img: dict[str, Any] = {}
        self.img2txts: dict[str, list[str]] = {}
        self.extra_json: dict[str, Any] = {}

    def add(self, id_: str, record: dict, txt_len: int | None = None) -> None:
        if id_ in self.id2len:
            raise ValueError(f"duplicate text id {id_!r}")
        if "input_ids" not in record or "img_fname" not in record:
            raise ValueError(f"record {id_!r} needs 'input_ids' and 'img_fname'")
        self._db[id_] = record
        self.id2len[id_] = int(len(record["input_ids"]) if txt_len is None else txt_len)
        img = record["img_fname"]
        self.txt2img[id_] = img
        for name in [img] if isinstance(img, str) else img:
            self.img2txts.setdefault(name, []).append(id_)

    def close(self) -> None:
        self._db.close()
        _dump_json(self.meta, self.db_dir / "meta.json", indent=2)
        _dump_json(self.id2len, self.db_dir / "id2len.json")
        _dump_json(self.txt2img, self.db_dir / "txt2img.json")
        _dump_json(self.img2txts, self.db_dir / "img2txts.json")
        for name, obj in self.extra_json.items():
            _dump_json(obj, self.db_dir / name)

    def __enter__(self) -> TxtDbWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._db.close()


def _check_finite(fname: str, key: str, source: np.ndarray, stored: np.ndarray) -> None:
    """Refuse an image array whose stored values (``source`` after the float16 cast) are not all finite."""
    if stored.dtype.kind not in "fc":
        return
    finite = np.isfinite(stored)
    if finite.all():
        return
    idx = tuple(int(i) for i in np.argwhere(~finite)[0])
    value = source[idx]
    if stored.dtype == np.float16 and np.isfinite(value):
        limit = float(np.finfo(np.float16).max)
        raise DataFormatError(
            f"image {fname!r}: {key!r} value {float(value)!r} at {list(idx)} is outside the float16 range "
            f"(|x| <= {limit:g}): the img_db stores float32 arrays as float16 (as the authors' conversion does), "
            "where it would become inf; rescale the values"
        )
    raise DataFormatError(f"image {fname!r}: {key!r} value at {list(idx)} is {value.item()!r}, not a finite number")


class ImgDbWriter:
    """Writes an ``img_db``: one LMDB of regions chosen by conf_th/max_bb/min_bb, plus ``nbb_*.json``.

    ``add(fname, features=[n, D], norm_bb=[n, 6], conf=[n], soft_labels=[n, C] | None)``
    keeps the first ``nbb`` regions in the order given (``nbb = clip(#(conf > conf_th), min_bb,
    max_bb)``; every region with ``keep_all``; ``num_bb`` at most when ``conf_th == -1``), never
    reordered, and stores float32 arrays as float16, as the authors' conversion script does: a detector
    that lists its boxes by confidence gives the most confident ones, and a ground-truth-box db keeps region
    ``j`` the ``j``-th box (referring expressions' ``ann_ids`` order). Non-finite values (a confidence, or a
    kept region's value, float32 values beyond float16's range included), features or boxes not of a
    floating-point type, and features of another width than the earlier images' are a
    :class:`DataFormatError` naming the image and the array.
    """

    def __init__(
        self,
        img_dir: str | Path,
        conf_th: float = 0.2,
        max_bb: int = 100,
        min_bb: int = 10,
        num_bb: int = 36,
        compress: bool = True,
        keep_all: bool = False,
    ):
        self.img_dir = Path(img_dir)
        self.conf_th, self.max_bb, self.min_bb, self.num_bb = conf_th, max_bb, min_bb, num_bb
        self.compress = compress
        self.keep_all = keep_all
        if keep_all:
            name = "all_compressed" if compress else "all"
        else:
            name = img_db_name(conf_th, max_bb, min_bb, num_bb, compress)
        self.db_path = self.img_dir / name
        if self.db_path.exists():
            raise FileExistsError(f"{self.db_path} exists; remove it to re-process")
        self.db_path.mkdir(parents=True)
        self._env = lmdb.open(str(self.db_path), map_size=1 << 40, subdir=True)
        self._txn = self._env.begin(write=True)
        self.name2nbb: dict[str, int] = {}
        self._img_dim: int | None = None

    def add(
        self,
        fname: str,
        features: np.ndarray,
        norm_bb: np.ndarray,
        conf: np.ndarray,
        soft_labels: np.ndarray | None = None,
    ) -> int:
        if fname in self.name2nbb:
            raise ValueError(f"duplicate image name {fname!r}")
        features, norm_bb, conf = np.asarray(features), np.asarray(norm_bb), np.asarray(conf)
        n = features.shape[0]
        if features.ndim != 2 or norm_bb.shape != (n, 6) or conf.shape != (n,):
            raise ValueError(
                f"{fname}: want features [n, D], norm_bb [n, 6], conf [n]; "
                f"got {features.shape}, {norm_bb.shape}, {conf.shape}"
            )
        arrays = {"features": features, "norm_bb": norm_bb, "conf": conf}
        if soft_labels is not None:
            soft_labels = np.asarray(soft_labels)
            if soft_labels.ndim != 2 or soft_labels.shape[0] != n:
                raise ValueError(f"{fname}: soft_labels must be [n, C], got {soft_labels.shape}")
            arrays["soft_labels"] = soft_labels
        for key in ("features", "norm_bb"):
            if arrays[key].dtype.kind != "f":
                dtype = arrays[key].dtype
                raise DataFormatError(f"image {fname!r}: {key!r} has dtype {dtype}, not a floating-point type")
        width = int(features.shape[1])
        if self._img_dim is not None and width != self._img_dim:
            raise DataFormatError(
                f"image {fname!r}: 'features' are {width} wide but the earlier images' {self._img_dim} (one width "
                "per img_db)"
            )
        if conf.dtype.kind in "fc" and not np.isfinite(conf).all():
            k = int(np.flatnonzero(~np.isfinite(conf))[0])
            raise DataFormatError(f"image {fname!r}: 'conf' region {k} is {conf[k].item()!r}, not a finite confidence")
        if self.keep_all:
            nbb = n
        elif self.conf_th == -1:
            nbb = min(self.num_bb, n)
        else:
            nbb = min(compute_num_bb(conf, self.conf_th, self.min_bb, self.max_bb), n)
        dump = {}
        for key, arr in arrays.items():
            arr = arr[:nbb]  # the first regions in the given order, as the authors' script: never reordered
            if arr.dtype == np.float32:
                with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused below, naming the image
                    dump[key] = arr.astype(np.float16)
            else:
                dump[key] = arr
            _check_finite(fname, key, arr, dump[key])
        self._txn.put(fname.encode("utf-8"), encode_img_record(dump, self.compress))
        self.name2nbb[fname] = int(nbb)
        self._img_dim = width
        if len(self.name2nbb) % 1000 == 0:
            self._txn.commit()
            self._txn = self._env.begin(write=True)
        return nbb

    def close(self) -> None:
        self._txn.put(_KEYS_KEY, json.dumps(list(self.name2nbb)).encode("utf-8"))
        self._txn.commit()
        self._env.close()
        if self.conf_th != -1 and not self.keep_all:
            _dump_json(self.name2nbb, self.img_dir / nbb_file_name(self.conf_th, self.max_bb, self.min_bb))

    def __enter__(self) -> ImgDbWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._txn.abort()
            self._env.close()


def iter_lmdb_keys(path: str | Path) -> Iterable[str]:
    """Keys of an LMDB directory (for inspection tools)."""
    return [k.decode("utf-8", "replace") for k in _LazyEnv(str(path)).keys()]
