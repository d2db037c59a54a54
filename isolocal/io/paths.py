"""Where a command writes: checked before any work, so an unwritable output fails in one line at once
instead of as an OSError after minutes of training or evaluation.

`check_writable_dir` creates and removes a uniquely named directory in the output directory (or, when
that does not exist yet, in its nearest existing parent, where it would be created): the same write
permission a file or directory there needs, nothing left behind whether the check passes or fails, and
no collision between processes of one run that check the same directory at once.

`shared_mode` and `atomic_write_text`: files written through a temporary file (`mkstemp` makes it
0600) get the mode a plain `open` would give them under the user's umask (0644 under umask 022), so
collaborators on a shared file system can read a study's results.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from isolocal.errors import OutputError


def _nearest_existing(path: Path) -> Path:
    """`path` or its nearest parent that exists (`exists()` is False below a regular file, too)."""
    return next((candidate for candidate in (path, *path.parents) if candidate.exists()), Path("."))


def check_writable_dir(directory: str | os.PathLike, what: str = "output directory") -> None:
    """Refuse (`OutputError` naming `directory`) a directory that cannot be created or written: a read-only
    or permission-less directory or file system, or a parent that is a regular file."""
    directory = Path(directory)
    existing = _nearest_existing(directory)
    if not existing.is_dir():
        raise OutputError(f"cannot write the {what} {directory}: {existing} is a file, not a directory; "
                          "choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".isolocal-write-check-", dir=existing))
    except OSError as err:
        where = "" if existing == directory else f" (creating it in {existing})"
        raise OutputError(f"cannot write the {what} {directory}{where}: {err.strerror or err}; choose a "
                          "writable path") from None


def check_writable_file(path: str | os.PathLike, what: str = "output file") -> None:
    """`check_writable_dir` for the directory a file goes to, and refuse a path that is a directory."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"the {what} {path} is a directory; name a file")
    check_writable_dir(path.parent, f"directory of the {what}")


def shared_mode() -> int:
    """0666 less the process's umask: the mode `open(path, "w")` gives a new file."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so a killed process never leaves half a file; the file
    gets the umask's mode, not the temporary file's private one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, shared_mode())
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
