"""Atomic file writes: write a temporary file in the same folder, then ``os.replace`` it.

Files are created with the permissions ``open()`` would give them (``0o666`` less the user's
umask), not the ``0o600`` of :func:`tempfile.mkstemp`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "atomic_write",
    "file_mode",
    "partial_dir",
    "recover_swap",
    "swap_in",
    "write_bytes",
    "write_csv",
    "write_json",
    "write_text",
    "write_torch",
]

_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """The mode a new file gets from ``open()``: ``0o666`` less the process's umask."""
    with _UMASK_LOCK:  # reading the umask means setting it; the lock keeps that safe
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Calls ``write(file)`` on a temporary file beside ``path``, then renames it to ``path``.

    Readers see either the old file or the complete new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Writes ``data`` atomically."""

    def write(f: IO[bytes]) -> None:
        f.write(data)

    return atomic_write(path, write)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Writes ``text`` (UTF-8) atomically."""
    return write_bytes(path, text.encode("utf-8"))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return x.item()
    if isinstance(x, float) and x != x:  # NaN: JSON has no NaN
        return None
    return x


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Writes ``data`` as indented JSON atomically (numpy/torch scalars become numbers)."""
    return write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def write_csv(
    path: str | os.PathLike[str], rows: Sequence[dict[str, Any]], columns: Sequence[str]
) -> Path:
    """Writes ``rows`` (dicts) with the header ``columns`` atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return write_text(path, buf.getvalue())


def write_torch(path: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save(obj)`` atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f))


# --------------------------------------------------------------------------------------------
# Whole folders: build beside, swap at the end
# --------------------------------------------------------------------------------------------


def partial_dir(out: str | os.PathLike[str]) -> Path:
    """The folder a run or sweep bound for ``out`` is built in: ``OUT.partial`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _old_dir(out: Path) -> Path:
    return out.with_name(out.name + ".old")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def swap_in(new: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Puts the finished folder ``new`` in the place of ``out`` (which may not exist).

    ``out`` is renamed to ``OUT.old``, ``new`` to ``out``, then ``OUT.old`` is deleted: until the
    first rename the previous results are intact; a crash between the two renames is undone by
    :func:`recover_swap` (the previous results are put back unless the new ones are complete).
    """
    new, out = Path(new), Path(out)
    old = _old_dir(out)
    if old.exists():
        _remove(old)
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    if old.exists():
        _remove(old)
    return out


def recover_swap(out: str | os.PathLike[str], complete: Callable[[Path], bool]) -> None:
    """Finishes or undoes a :func:`swap_in` that stopped between its two renames.

    Args:
        out: the destination folder.
        complete: whether a built folder (``OUT.partial``) is complete and may take ``out``'s
            place.
    """
    out = Path(out)
    old, new = _old_dir(out), partial_dir(out)
    if not old.exists():
        return
    if out.exists():  # the swap was done; only the clean-up was left
        _remove(old)
    elif new.is_dir() and complete(new):
        os.replace(new, out)
        _remove(old)
    else:
        os.replace(old, out)
