"""Atomic checkpoint files, keep-last-N rotation, and the `last.pt` pointer a resume reads.

A checkpoint is written to a temporary file in the target directory, flushed to disk, then renamed
over the final name (`os.replace` is atomic on POSIX), so a crash mid-write leaves the previous
checkpoint intact and never a half-written file under a checkpoint name.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

LAST = "last.pt"
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to `path` via a temporary file + fsync + rename; the old file survives any failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's private 0600 would outlive the rename
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _atomic_link(src: Path, dst: Path) -> None:
    """Point `dst` at `src`'s content without rewriting it (hard link + rename), copying if links fail."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_save(torch.load(src, map_location="cpu", weights_only=True), dst)


def epoch_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """`epoch_NNNN.pt` files in `out_dir`, oldest first."""
    files = [p for p in Path(out_dir).glob("epoch_*.pt") if _EPOCH_FILE.fullmatch(p.name)]
    return sorted(files, key=lambda p: int(_EPOCH_FILE.fullmatch(p.name).group(1)))


def save_checkpoint(state: dict, out_dir: str | os.PathLike, epoch_end: int | None, keep_last: int) -> Path:
    """Write `state`; after `epoch_end` completed epochs as `epoch_NNNN.pt` (keeping the newest
    `keep_last`), otherwise (a stop mid-epoch) only as `last.pt`. `last.pt` always ends up current."""
    out_dir = Path(out_dir)
    last = out_dir / LAST
    if epoch_end is None:
        return atomic_save(state, last)
    path = atomic_save(state, out_dir / f"epoch_{epoch_end:04d}.pt")
    _atomic_link(path, last)
    for old in epoch_checkpoints(out_dir)[:-keep_last]:
        old.unlink()
    return path


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint dict; tensors only (weights_only), so loading never runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
