"""Build official ``txt_db`` / ``img_db`` directories from raw inputs.

``python -m villa_fast.data.convert img --npz-dir DIR --output IMG_DB [--conf-th 0.2 ...]``
reads one ``.npz`` per image (``features`` [n, D], ``norm_bb`` [n, 6] as x1,y1,x2,y2,w,h in
[0, 1], ``conf`` [n], optional ``soft_labels`` [n, C]; loaded without pickle) and writes
``IMG_DB/feat_th.._max.._min..[_compressed]`` and the ``nbb_*.json`` counts.

``python -m villa_fast.data.convert txt --task TASK --jsonl FILE --vocab vocab.txt --output TXT_DB``
reads one JSON object per line:

* every task: ``id`` (string), ``img_fname`` (an image database key, or a list of two for
  NLVR2 and VCR [gt-boxes image, detections image]) and the text as ``question`` /
  ``sentence`` / ``caption`` / ``hypothesis`` (tokenised here) or ``input_ids`` (kept);
* ``vqa``: ``answers``: ``[{"answer": str, "score": float}]`` mapped through ``--ans2label``
  (a JSON answer -> label map; unknown answers are counted and dropped from the target), or the
  annotators' raw answers ``[{"answer": str}, ...]`` (no ``score``: each distinct answer scored by
  how many gave it, 0.3 / 0.6 / 0.9 / 1, as the official txt_dbs), or
  ``target``: ``{"labels": [...], "scores": [...]}``;
* ``ve``: ``label``: ``contradiction`` / ``entailment`` / ``neutral`` in any case (or 0/1/2, in that order:
  the official SNLI-VE txt_dbs' and checkpoints' class order);
* ``nlvr2``: ``label``: true/false (or 1/0, or the strings ``"true"`` / ``"false"`` / ``"1"`` / ``"0"`` in
  any case);
* ``vcr``: ``answers`` (4 texts), ``rationales`` (4 texts), ``answer_label``, ``rationale_label`` (indices
  into them; absent or -1 on test records). A text may also be given as in the VCR annotations: a list of
  words and object references (lists of indices into the example's ``objects``); a reference to a
  ``person`` becomes the person tag ``person_<index>``, any other object its name, as in the preprocessing
  behind the official VCR txt_dbs. Person tags (also ``person_<n>`` words in a plain text) take the ids
  after the vocabulary, ``vocab size + n`` for n < 81: the 81 rows VCR models add;
* ``caption`` (retrieval and pre-training): nothing more;
* ``re``: ``image_id``, ``ann_id`` and ``ann_ids`` (the image's box ids in region order), the referred
  box ``bbox`` (COCO ``[x, y, w, h]`` in pixels: the ``acc_iou`` metric needs it, as the official
  databases hold it), and optionally the image size in pixels as ``width`` / ``height`` (COCO's names) or
  ``image_w`` / ``image_h`` (a detector's), which goes into the ``images.json`` entry of ``image_id``, as in
  the authors' databases (the records of one image must agree on it).

Records keep every input field and add the official keys, so the authors' readers can read them.
Image sizes are not part of an img_db (the authors' detector writes only the four arrays above to
its ``.npz`` files): ``.npz`` files holding ``image_w`` / ``image_h`` are refused with a pointer to
the text side.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from villa_fast.data.codec import DataFormatError
from villa_fast.data.db import CONVERTER_MARK, VCR_PERSON_TAGS, ImgDbWriter, TxtDbWriter, check_txt_record

__all__ = ["convert_images", "convert_texts", "main"]

logger = logging.getLogger(__name__)

TASKS = ("vqa", "ve", "nlvr2", "vcr", "caption", "re")
_TEXT_FIELDS = ("question", "sentence", "caption", "hypothesis", "text")
_VE_LABELS = {"contradiction": 0, "entailment": 1, "neutral": 2}  # the official class order
#: NLVR2 labels given as strings (compared lower-cased)
_NLVR2_STR_LABELS = {"true": 1, "false": 0, "1": 1, "0": 0}
#: tasks whose img_fname is a list of two image names (the others: one name)
_PAIR_TASKS = {"nlvr2": "the statement's two images", "vcr": "[ground-truth boxes image, detections image]"}
_IMG_ARRAYS = frozenset({"features", "norm_bb", "conf", "soft_labels"})
#: (width, height) key pairs an ``re`` example may give the image size under; the first is images.json's
_RE_SIZE_KEYS = (("width", "height"), ("image_w", "image_h"))


def convert_images(
    npz_dir: str | Path,
    output: str | Path,
    conf_th: float = 0.2,
    max_bb: int = 100,
    min_bb: int = 10,
    num_bb: int = 36,
    compress: bool = True,
) -> dict[str, int]:
    """Write an img_db from a directory of per-image ``.npz`` files; returns name -> regions kept."""
    files = sorted(Path(npz_dir).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz files in {npz_dir}")
    with ImgDbWriter(output, conf_th, max_bb, min_bb, num_bb, compress) as w:
        for f in files:
            try:
                with np.load(f, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            except ValueError as exc:
                raise DataFormatError(f"{f}: cannot load without pickle or corrupt ({exc})") from exc
            missing = {"features", "norm_bb", "conf"} - set(arrays)
            if missing:
                raise DataFormatError(f"{f}: missing arrays {sorted(missing)}")
            unknown = set(arrays) - _IMG_ARRAYS
            if unknown:
                hint = ""
                if unknown & {k for pair in _RE_SIZE_KEYS for k in pair}:
                    hint = (
                        "; an img_db stores no image size: give width / height with the referring-expression "
                        "examples (convert txt --task re), which write them to images.json"
                    )
                raise DataFormatError(f"{f}: unknown arrays {sorted(unknown)}{hint}")
            w.add(f.name, arrays["features"], arrays["norm_bb"], arrays["conf"], arrays.get("soft_labels"))
        return dict(w.name2nbb)


def _re_image_size(ex: dict, where: str) -> tuple | None:
    """An ``re`` example's image size ``(width, height)``, under either key pair (which must agree)."""
    from villa_fast.data.datasets import re_image_size

    sizes = {keys: size for keys in _RE_SIZE_KEYS if (size := re_image_size(ex, where, keys)) is not None}
    if len(set(sizes.values())) > 1:
        got = ", ".join(f"{w}={s[0]!r} {h}={s[1]!r}" for (w, h), s in sizes.items())
        raise DataFormatError(f"{where}: the image size keys disagree ({got})")
    return next(iter(sizes.values()), None)


def _text_ids(ex: dict, tok, where: str) -> list[int]:
    if "input_ids" in ex:
        return [int(x) for x in ex["input_ids"]]
    for field in _TEXT_FIELDS:
        if field in ex:
            if tok is None:
                raise ValueError(f"{where}: text given but no --vocab to tokenise it")
            return tok(ex[field])
    raise DataFormatError(f"{where}: no text field (one of {_TEXT_FIELDS} or input_ids)")


def _ids_of(texts, tok, where: str) -> list[list[int]]:
    out = []
    for t in texts:
        if isinstance(t, str):
            if tok is None:
                raise ValueError(f"{where}: text given but no --vocab to tokenise it")
            out.append(tok(t))
        else:
            out.append([int(x) for x in t])
    return out


def _field(ex: dict, key: str, task: str, where: str):
    if key not in ex:
        raise DataFormatError(f"{where}: missing key {key!r} (a {task} example needs it)")
    return ex[key]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ve_label(lab, where: str) -> int:
    """An SNLI-VE label: one of the three class names (any case) or its index 0 / 1 / 2."""
    if isinstance(lab, str) and lab.lower() in _VE_LABELS:
        return _VE_LABELS[lab.lower()]
    if _is_int(lab) and 0 <= lab < len(_VE_LABELS):
        return lab
    raise DataFormatError(
        f"{where}: ve 'label' {lab!r} is not one of {sorted(_VE_LABELS)} (any case) or their indices "
        f"{sorted(_VE_LABELS.values())}"
    )


def _nlvr2_label(lab, where: str) -> int:
    """An NLVR2 label: true / false as a JSON boolean, 1 / 0, or the strings "true" / "false" / "1" / "0" (any
    case)."""
    if isinstance(lab, bool):
        return int(lab)
    if _is_int(lab) and lab in (0, 1):
        return lab
    if isinstance(lab, str) and lab.lower() in _NLVR2_STR_LABELS:
        return _NLVR2_STR_LABELS[lab.lower()]
    raise DataFormatError(
        f'{where}: nlvr2 \'label\' {lab!r} is not true / false, 1 / 0 or one of the strings "true", "false", '
        '"1", "0" (any case)'
    )


def _vcr_label(ex: dict, key: str, n: int, where: str) -> int:
    """A VCR answer / rationale label: an index into the ``n`` candidates, or -1 (absent: a test record)."""
    lab = ex.get(key, -1)
    if not _is_int(lab) or not -1 <= lab < n:
        raise DataFormatError(f"{where}: vcr {key!r} {lab!r} is not a candidate index in [0, {n}) (or -1: none)")
    return lab


def _vcr_words(text, objects, where: str) -> list[str]:
    """The words of a VCR text: a plain string's, or an annotation token list's (words, and object references
    as lists of indices into ``objects``: ``person_<index>`` for a person, the object's name otherwise)."""
    if isinstance(text, str):
        return text.split()
    words = []
    for item in text:
        if isinstance(item, str):
            words.extend(item.split())
        elif isinstance(item, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in item):
            for i in item:
                if not isinstance(objects, list) or not 0 <= i < len(objects):
                    raise DataFormatError(f"{where}: vcr object reference {i} is not an index into 'objects'")
                name = str(objects[i])
                words.append(f"{name}_{i}" if "person" in name else name)
        else:
            raise DataFormatError(
                f"{where}: a vcr token list holds words and lists of object indices, got {item!r:.60}"
            )
    return words


def _vcr_ids(text, objects, tok, where: str) -> list[int]:
    """Token ids of a VCR text: WordPiece for words, ``vocab size + n`` for the person tag ``person_<n>``."""
    if isinstance(text, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in text):
        return [int(x) for x in text]  # ids given
    if tok is None:
        raise ValueError(f"{where}: text given but no --vocab to tokenise it")
    base = len(tok.vocab)
    ids: list[int] = []
    for word in _vcr_words(text, objects, where):
        head, _, num = word.rpartition("_")
        if head == "person" and num.isdigit():
            if int(num) >= VCR_PERSON_TAGS:
                raise DataFormatError(
                    f"{where}: person tag {word!r}: VCR models have {VCR_PERSON_TAGS} person tags (person_0 .. "
                    f"person_{VCR_PERSON_TAGS - 1})"
                )
            ids.append(base + int(num))
        else:
            ids.extend(tok(word))
    return ids


def _candidates(ex: dict, key: str, tok, where: str) -> list[list[int]]:
    texts = _field(ex, key, "vcr", where)
    if not isinstance(texts, list) or not texts:
        raise DataFormatError(f"{where}: vcr {key!r} must be a non-empty list of texts, got {texts!r:.80}")
    return [_vcr_ids(t, ex.get("objects"), tok, where) for t in texts]


def _check_img_fname(img, task: str, where: str) -> None:
    """``img_fname`` as the task's readers take it: a name, or for NLVR2 and VCR a list of two names."""
    pair = _PAIR_TASKS.get(task)
    if pair is None:
        if not isinstance(img, str):
            raise DataFormatError(f"{where}: {task} needs 'img_fname' as an image name, got {img!r:.80}")
    elif not (isinstance(img, list) and len(img) == 2 and all(isinstance(x, str) for x in img)):
        raise DataFormatError(f"{where}: {task} needs 'img_fname' as a list of two names ({pair}), got {img!r:.80}")


def vqa_soft_score(count: int) -> float:
    """The soft score of an answer ``count`` of the (ten) annotators gave, as in the preprocessing behind the
    official VQA txt_dbs (bottom-up attention's ``get_score``): 0.3 per annotator, 1 from four on."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def _vqa_target(answers, ans2label: dict, stats: dict, where: str) -> tuple[list[int], list[float]]:
    """Labels and scores of a VQA example's ``answers``: scored entries as given (an answer listed twice keeps
    its highest score), or raw annotator answers (no ``score``) counted into soft scores."""
    if not isinstance(answers, list) or not all(isinstance(a, dict) and "answer" in a for a in answers):
        raise DataFormatError(f"{where}: vqa 'answers' must be a list of {{'answer': ..., 'score': ...}} objects")
    scored = ["score" in a for a in answers]
    if any(scored) and not all(scored):
        raise DataFormatError(
            f"{where}: some vqa answers have a 'score' and some do not: give every answer its score, or none "
            "(the annotators' raw answers, counted into soft scores)"
        )
    best: dict[int, float] = {}
    if all(scored):
        for a in answers:
            lab = ans2label.get(a["answer"])
            if lab is None:
                stats["unknown_answers"] += 1
                continue
            best[int(lab)] = max(best.get(int(lab), 0.0), float(a["score"]))
    else:
        counts: dict[str, int] = {}
        for a in answers:
            counts[a["answer"]] = counts.get(a["answer"], 0) + 1
        for ans, n in counts.items():
            lab = ans2label.get(ans)
            if lab is None:
                stats["unknown_answers"] += 1
                continue
            best[int(lab)] = vqa_soft_score(n)
    return list(best), list(best.values())


def convert_texts(
    task: str,
    jsonl: str | Path,
    output: str | Path,
    vocab: str | Path | None = None,
    *,
    lowercase: bool = False,
    ans2label: dict[str, int] | None = None,
    meta: dict | None = None,
    tokenizer=None,
) -> dict:
    """Write a txt_db for ``task`` from a JSONL file; returns counts ``{"written", "unknown_answers"}``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    from villa_fast.data.tokenizer import WordPieceTokenizer

    tok = tokenizer
    if tok is None and vocab is not None:
        tok = WordPieceTokenizer(vocab, lowercase=lowercase)
    full_meta = dict(tok.meta() if tok is not None else {})
    full_meta.update(meta or {})
    full_meta["task"] = task
    # the mark tells readers that "task" is one of this package's task names (see CONVERTER_MARK)
    full_meta.update(CONVERTER_MARK)
    if ans2label is not None:
        full_meta["num_answers"] = len(ans2label)
    v_range = full_meta.get("v_range")
    # the bound the readers hold the token ids to (VCR's person tags follow the vocabulary)
    vocab_end = None
    if isinstance(v_range, list | tuple) and len(v_range) == 2 and isinstance(v_range[1], int):
        vocab_end = v_range[1] + (VCR_PERSON_TAGS if task == "vcr" else 0)
    stats = {"written": 0, "unknown_answers": 0}
    id2len_qa, id2len_qar, images = {}, {}, {}
    with open(jsonl, encoding="utf-8") as fh, TxtDbWriter(output, full_meta) as w:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{jsonl}:{lineno}"
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{where}: not valid JSON ({exc})") from exc
            if not isinstance(ex, dict):
                raise DataFormatError(f"{where}: an example must be a JSON object, got {type(ex).__name__}")
            for key in ("id", "img_fname"):
                if key not in ex:
                    raise DataFormatError(f"{where}: missing key {key!r}")
            _check_img_fname(ex["img_fname"], task, where)
            id_ = str(ex["id"])
            rec = dict(ex)
            if task != "vcr" or "input_ids" in ex or not isinstance(ex.get("question"), list):
                rec["input_ids"] = _text_ids(ex, tok, where)
            txt_len = None
            if task == "vqa":
                if "target" in ex:
                    tgt = ex["target"]
                    if not isinstance(tgt, dict) or not all(isinstance(tgt.get(k), list) for k in ("labels", "scores")):
                        raise DataFormatError(
                            f"{where}: vqa 'target' must be {{'labels': [...], 'scores': [...]}}, got {tgt!r:.80}"
                        )
                    rec["target"] = {"labels": list(tgt["labels"]), "scores": list(tgt["scores"])}
                elif "answers" in ex:
                    if ans2label is None:
                        raise ValueError("task vqa with 'answers' needs --ans2label")
                    labels, scores = _vqa_target(ex["answers"], ans2label, stats, where)
                    rec["target"] = {"labels": labels, "scores": scores}
            elif task == "ve":
                lab = _ve_label(_field(ex, "label", task, where), where)
                rec["target"] = {"labels": [lab], "scores": [1.0]}
            elif task == "nlvr2":
                rec["target"] = _nlvr2_label(_field(ex, "label", task, where), where)
            elif task == "vcr":
                if "input_ids" not in ex:
                    question = next((ex[f] for f in _TEXT_FIELDS if f in ex), None)
                    rec["input_ids"] = _vcr_ids(question, ex.get("objects"), tok, where)
                rec["input_ids_as"] = _candidates(ex, "answers", tok, where)
                rec["input_ids_rs"] = _candidates(ex, "rationales", tok, where)
                rec["qa_target"] = _vcr_label(ex, "answer_label", len(rec["input_ids_as"]), where)
                rec["qar_target"] = _vcr_label(ex, "rationale_label", len(rec["input_ids_rs"]), where)
                q = len(rec["input_ids"])
                ma = max(len(a) for a in rec["input_ids_as"])
                mr = max(len(r) for r in rec["input_ids_rs"])
                # the official VCR txt_dbs' lengths: a question's four Q->A rows priced together, (q + the
                # longest answer) * 4, plus the longest rationale for QA->R; max_txt_len and the token
                # buckets read these, so batches and filtering match the authors' runs
                id2len_qa[id_] = (q + ma) * 4
                id2len_qar[id_] = (q + ma) * 4 + mr
                txt_len = id2len_qar[id_]
            elif task == "re":
                for key in ("image_id", "ann_id", "ann_ids"):
                    if key not in ex:
                        raise DataFormatError(f"{where}: missing key {key!r}")
                entry = images.setdefault(ex["image_id"], {"id": ex["image_id"], "ann_ids": list(ex["ann_ids"])})
                if entry["ann_ids"] != list(ex["ann_ids"]):
                    raise DataFormatError(
                        f"{where}: image {ex['image_id']!r} lists ann_ids {list(ex['ann_ids'])!r} here but "
                        f"{entry['ann_ids']!r} in an earlier example (one region order per image)"
                    )
                size = _re_image_size(ex, where)
                if size is not None:
                    known = (entry.get("width"), entry.get("height"))
                    if "width" in entry and known != size:
                        raise DataFormatError(
                            f"{where}: image {ex['image_id']!r} is {size[0]!r} x {size[1]!r} pixels here but "
                            f"{known[0]!r} x {known[1]!r} in an earlier example"
                        )
                    entry["width"], entry["height"] = size
            check_txt_record(rec, where, vocab_end)  # what every reader checks (token ids, scores...), refused here
            w.add(id_, rec, txt_len)
            stats["written"] += 1
        if task == "vcr":
            w.extra_json["id2len_qa.json"] = id2len_qa
            w.extra_json["id2len_qar.json"] = id2len_qar
        if task == "re":
            w.extra_json["images.json"] = list(images.values())
        if ans2label is not None:
            w.extra_json["ans2label.json"] = ans2label
    if stats["unknown_answers"]:
        logger.warning("%s: %d answers not in ans2label were left out of targets", jsonl, stats["unknown_answers"])
    return stats


def _parser(prog: str = "python -m villa_fast.data.convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Build official UNITER/VILLA txt_db and img_db LMDB directories from raw inputs.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("img", help="per-image .npz detections -> img_db")
    pi.add_argument("--npz-dir", required=True, help="directory of <image name>.npz files")
    pi.add_argument("--output", required=True, help="img_db directory to write")
    pi.add_argument("--conf-th", type=float, default=0.2, help="confidence threshold (-1: fixed --num-bb)")
    pi.add_argument("--max-bb", type=int, default=100)
    pi.add_argument("--min-bb", type=int, default=10)
    pi.add_argument("--num-bb", type=int, default=36)
    pi.add_argument("--no-compress", action="store_true", help="msgpack records instead of compressed npz")
    doc, start, stop = __doc__ or "", "reads one JSON object per line:", "Records keep every input"
    fields = doc[doc.index(start) + len(start) : doc.index(stop)].strip() if start in doc and stop in doc else ""
    pt = sub.add_parser(
        "txt",
        help="JSONL examples -> txt_db",
        description="Write a txt_db from a JSONL file, one JSON object (example) per line"
        + (":\n\n" + fields if fields else "."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pt.add_argument("--task", required=True, choices=TASKS)
    pt.add_argument("--jsonl", required=True, help="one JSON example per line (the fields above)")
    pt.add_argument("--output", required=True, help="txt_db directory to write")
    pt.add_argument(
        "--vocab",
        help="WordPiece vocab.txt (required: it tokenises the text and gives the txt_db meta its CLS, SEP, MASK and "
        "v_range, also when the examples carry input_ids)",
    )
    pt.add_argument("--lowercase", action="store_true", help="lowercase before WordPiece (uncased vocabularies)")
    pt.add_argument("--ans2label", help="VQA answer -> label JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback of input errors (normally one line)")
    return p


def _read_ans2label(path: str) -> dict[str, int]:
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(f"--ans2label {path}: not a JSON file ({exc})") from None
    if not isinstance(obj, dict) or not all(_is_label(v) for v in obj.values()):
        raise DataFormatError(f"--ans2label {path}: must be a JSON object mapping answers to integer labels")
    return obj


def _is_label(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class _RemoveOnFailure:
    """Removes what a failed (or interrupted) conversion created under ``output``: the whole directory when it did
    not exist before, else only the entries added to it; never what was there before."""

    def __init__(self, output: str | Path):
        self.output = Path(output)
        self.existed = self.output.exists() or self.output.is_symlink()
        self.before = {p.name for p in self.output.iterdir()} if self.output.is_dir() else None

    def __enter__(self) -> _RemoveOnFailure:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            return
        import shutil

        if not self.existed:
            if self.output.is_dir() and not self.output.is_symlink():
                shutil.rmtree(self.output, ignore_errors=True)
            return
        if self.before is None or not self.output.is_dir():
            return
        for p in self.output.iterdir():
            if p.name in self.before:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def main(
    argv: Sequence[str] | None = None, prog: str | None = None, *, report_errors: bool = False, debug: bool = False
) -> int:
    """The convert command line. ``report_errors`` (the console entry points): an input error prints
    ``error: ...`` and returns 2 instead of raising (``--debug`` / ``debug``: raised). A failed conversion
    removes the output it created, so that a rerun starts clean."""
    parser = _parser(prog) if prog else _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.cmd == "txt" and not args.vocab:
        parser.error(
            "--vocab is required for convert txt: the vocabulary tokenises the text and gives the txt_db meta "
            "its CLS, SEP, MASK and v_range (also when the examples carry input_ids)"
        )
    if not report_errors:
        return _run(args)
    from villa_fast.cli import run_reporting_errors

    return run_reporting_errors(lambda: _run(args), debug=debug or args.debug)


def _run(args) -> int:
    if args.cmd == "img":
        with _RemoveOnFailure(args.output):
            name2nbb = convert_images(
                args.npz_dir, args.output, args.conf_th, args.max_bb, args.min_bb, args.num_bb, not args.no_compress
            )
        print(f"wrote {len(name2nbb)} images to {args.output}")
    else:
        ans2label = _read_ans2label(args.ans2label) if args.ans2label else None
        with _RemoveOnFailure(args.output):
            stats = convert_texts(
                args.task, args.jsonl, args.output, args.vocab, lowercase=args.lowercase, ans2label=ans2label
            )
        print(f"wrote {stats['written']} examples to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(report_errors=True))
