"""Byte encodings of the official text and image records.

Text records: ``lz4.frame(msgpack(dict))`` packed with ``use_bin_type=True``; numpy
values use msgpack-numpy's map layout (``{b"nd": True, b"type": ..., b"shape": ...,
b"data": ...}``).

Image records: either msgpack as above (the plain ``feat_*`` databases) or the
bytes of an ``.npz`` archive (the ``*_compressed`` databases).

Decoding never executes data: msgpack-numpy maps that declare an object or
structured dtype (which msgpack-numpy would unpickle) and ``.npz`` members that
need pickle are rejected with :class:`DataFormatError`.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np

__all__ = [
    "DataFormatError",
    "decode_img_record",
    "decode_txt_record",
    "encode_img_record",
    "encode_txt_record",
    "npz_bytes",
]

_NPZ_MAGIC = b"PK\x03\x04"
# numeric kinds only: bool, signed, unsigned, float, complex
_SAFE_KINDS = frozenset("biufc")
# fixed timestamp so that identical arrays always give identical archive bytes
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


_SKIPPED = np.empty(0)


class DataFormatError(ValueError):
    """A record or side file does not follow the expected format."""


def _safe_ext_hook(obj: dict) -> Any:
    """msgpack ``object_hook``: rebuild numpy values without ever unpickling."""
    if b"nd" not in obj:
        if b"complex" in obj and b"data" in obj:
            return complex(obj[b"data"].decode() if isinstance(obj[b"data"], bytes) else obj[b"data"])
        return obj
    kind = obj.get(b"kind", b"")
    if kind not in (b"", ""):
        raise DataFormatError(f"numpy value of dtype kind {kind!r} would need pickle; refusing to decode it")
    try:
        dtype = np.dtype(obj[b"type"])
    except (TypeError, ValueError, KeyError) as exc:
        raise DataFormatError(f"bad numpy dtype in record: {exc}") from exc
    if dtype.hasobject or dtype.kind not in _SAFE_KINDS:
        raise DataFormatError(f"numpy dtype {dtype} is not numeric; refusing to decode it")
    data = obj.get(b"data")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DataFormatError("numpy value without a byte payload")
    if obj[b"nd"] is True:
        shape = tuple(int(s) for s in obj.get(b"shape", ()))
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if len(data) != count * dtype.itemsize:
            raise DataFormatError(f"numpy payload of {len(data)} bytes does not fit shape {shape} of {dtype}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if len(data) != dtype.itemsize:
        raise DataFormatError("numpy scalar payload has the wrong size")
    return np.frombuffer(data, dtype=dtype)[0]


def _unpack(raw: bytes | memoryview) -> Any:
    return msgpack.unpackb(raw, raw=False, object_hook=_safe_ext_hook, strict_map_key=False)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, default=msgpack_numpy.encode)


def encode_txt_record(record: dict) -> bytes:
    """Encode one text record as the official ``lz4(msgpack)`` bytes."""
    return lz4.frame.compress(_pack(record))


def decode_txt_record(raw: bytes | memoryview, where: str = "text record") -> dict:
    """Decode ``lz4(msgpack)`` bytes; ``where`` names the database and key in errors."""
    try:
        obj = _unpack(lz4.frame.decompress(raw))
    except DataFormatError as exc:
        raise DataFormatError(f"{where}: {exc}") from exc
    except Exception as exc:  # lz4 / msgpack raise several unrelated types
        raise DataFormatError(f"{where}: corrupt or truncated record ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a map, found {type(obj).__name__}")
    return obj


def npz_bytes(arrays: dict[str, np.ndarray], compress: bool = True) -> bytes:
    """Bytes of an ``.npz`` archive (``np.load`` reads it), identical for identical arrays."""
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = method
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def encode_img_record(arrays: dict[str, np.ndarray], compress: bool) -> bytes:
    """Encode one image record: ``.npz`` bytes when ``compress`` else msgpack(+numpy)."""
    for name, arr in arrays.items():
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in _SAFE_KINDS:
            raise DataFormatError(f"image array {name!r} must be a numeric numpy array")
    if compress:
        return npz_bytes(arrays, compress=True)
    return _pack(dict(arrays))


def decode_img_record(
    raw: bytes | memoryview, where: str = "image record", keys: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """Decode an image record of either encoding (told apart by the zip magic number).

    ``keys`` limits which ``.npz`` members are parsed (the others are still listed as present
    with an empty placeholder so key checks see them)."""
    raw = bytes(raw)
    try:
        if raw[:4] == _NPZ_MAGIC:
            with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
                out = {k: (npz[k] if keys is None or k in keys else _SKIPPED) for k in npz.files}
        else:
            out = _unpack(raw)
    except DataFormatError as exc:
        raise DataFormatError(f"{where}: {exc}") from exc
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataFormatError(f"{where}: array would need pickle; refusing to load it") from exc
        raise DataFormatError(f"{where}: corrupt or truncated record ({exc})") from exc
    except Exception as exc:
        raise DataFormatError(f"{where}: corrupt or truncated record ({type(exc).__name__}: {exc})") from exc
    if not isinstance(out, dict):
        raise DataFormatError(f"{where}: expected a map of arrays, found {type(out).__name__}")
    for k, v in out.items():
        if v is _SKIPPED:
            continue
        if not isinstance(v, np.ndarray):
            raise DataFormatError(f"{where}: value {k!r} is not an array")
    return out
