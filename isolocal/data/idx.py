"""IDX files (the MNIST family's format), raw or gzip'd, with errors that name the broken file."""
from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

from isolocal.errors import DatasetError

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _open_idx(path: str):
    """Open raw or gzip'd IDX by content, not by suffix, so a renamed file still reads."""
    with open(path, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _parse_idx_header(head: bytes, path: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """Decode magic + dims -> (dtype, shape, header length in bytes)."""
    if len(head) < 4:
        raise DatasetError(f"{path}: truncated IDX file ({len(head)} bytes, no complete magic number)")
    if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{head[:4].hex()} "
            f"(expected 0x0000TTDD with type TT in {sorted(hex(k) for k in _IDX_DTYPES)})"
        )
    ndim = head[3]
    hlen = 4 + 4 * ndim
    if len(head) < hlen:
        raise DatasetError(f"{path}: truncated IDX header ({len(head)} of {hlen} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(head[4:hlen], dtype=">u4"))
    return _IDX_DTYPES[head[2]], shape, hlen


def read_idx_header(path: str) -> tuple[np.dtype, tuple[int, ...]]:
    """Read only the header, so a dataset can validate all its files before decompressing any."""
    try:
        with _open_idx(path) as f:
            head = f.read(4)
            if len(head) == 4:
                head += f.read(4 * head[3])
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: file not found") from e
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read IDX header ({e})") from e
    dtype, shape, _ = _parse_idx_header(head, path)
    return dtype, shape


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip'd) into a native-endian array of the shape its header declares.

    Any missing, truncated or malformed file raises ``DatasetError`` naming ``path``, because a bare
    ``EOFError`` from gzip says nothing about which of several data files is broken.
    """
    path = os.fspath(path)
    try:
        with _open_idx(path) as f:
            buf = f.read()
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: file not found") from e
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: truncated or corrupt file ({e})") from e
    dtype, shape, hlen = _parse_idx_header(buf, path)
    expected = hlen + math.prod(shape) * dtype.itemsize
    if len(buf) != expected:
        raise DatasetError(
            f"{path}: size mismatch, header declares shape {shape} of {dtype.name} "
            f"({expected} bytes with header) but the file holds {len(buf)} bytes"
        )
    return np.frombuffer(buf, dtype=dtype, offset=hlen).reshape(shape).astype(dtype.newbyteorder("="))
