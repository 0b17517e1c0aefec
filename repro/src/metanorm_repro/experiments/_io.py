"""Atomic file writes, folder swaps, the lock on an output folder and file digests.

Files are written to a temporary file in the same folder, then renamed with ``os.replace``;
they get the permissions ``open()`` would give them (``0o666`` less the user's umask), not the
``0o600`` of :func:`tempfile.mkstemp`. An ``OSError`` raised while writing names the file
(:func:`describe_oserror` turns it into one line).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "FolderLock",
    "FolderLocked",
    "atomic_write",
    "check_deletable",
    "check_writable",
    "describe_oserror",
    "file_mode",
    "lock_path",
    "partial_dir",
    "recover_swap",
    "scratch_dir",
    "sha256",
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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _named(exc, path) from exc
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _named(exc, path) from exc
        raise
    return path


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its file name (a failed ``write()`` names no file)."""
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror or os.strerror(exc.errno), str(path))


def describe_oserror(exc: OSError) -> str:
    """One line for an ``OSError``: the path(s) and the cause.

    E.g. ``/out/x.json: No space left on device (ENOSPC)``.
    """
    if exc.errno is None:
        return str(exc)
    cause = exc.strerror or os.strerror(exc.errno)
    code = errno.errorcode.get(exc.errno)
    if code:
        cause = f"{cause} ({code})"
    if exc.filename is None:
        return cause
    where = str(exc.filename)
    if getattr(exc, "filename2", None) is not None:
        where = f"{where} -> {exc.filename2}"
    return f"{where}: {cause}"


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
    """``torch.save(obj)`` atomically.

    The object is serialised in memory first: ``torch.save`` into a file that fails (a full
    disk) raises an error of its own without the cause; a plain write raises the ``OSError``.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 digest of a file, in hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Whole folders: build beside, swap at the end
# --------------------------------------------------------------------------------------------


def partial_dir(out: str | os.PathLike[str]) -> Path:
    """The folder a run or sweep bound for ``out`` is built in: ``OUT.partial`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def scratch_dir(out: str | os.PathLike[str]) -> Path:
    """Where the worker processes of a sweep bound for ``out`` train: ``OUT.jobs`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".jobs")


def _old_dir(out: Path) -> Path:
    return out.with_name(out.name + ".old")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Raises the ``OSError`` of creating a file in ``folder`` (read-only, no permission)."""
    folder = Path(folder)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-check.", dir=folder)
    except OSError as exc:
        raise _named(exc, folder) from exc
    os.close(fd)
    os.unlink(tmp)


def check_deletable(tree: str | os.PathLike[str]) -> None:
    """Raises an ``OSError`` naming the first folder of ``tree`` whose entries cannot be deleted.

    Deleting a folder's entries needs write permission on the folder, so each folder of the
    tree (``tree`` itself included) is tried with :func:`check_writable`.
    """
    tree = Path(tree)
    if not tree.is_dir() or tree.is_symlink():
        return
    for root, dirs, _ in os.walk(tree):
        check_writable(root)
        dirs[:] = [d for d in dirs if not (Path(root) / d).is_symlink()]


def swap_in(new: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Puts the finished folder ``new`` in the place of ``out`` (which may not exist).

    ``out`` is renamed to ``OUT.old``, ``new`` to ``out``, then ``OUT.old`` is deleted: until the
    first rename the previous results are intact; a crash between the two renames is undone by
    :func:`recover_swap` (the previous results are put back unless the new ones are complete).
    Before the first rename, the parent folder must take new entries and every folder of
    ``out`` must let its entries be deleted: otherwise the ``OSError`` names the folder and
    nothing is moved. A failure to delete ``OUT.old`` after the swap is a warning.
    """
    new, out = Path(new), Path(out)
    old = _old_dir(out)
    check_writable(out.parent)
    check_deletable(out)
    try:
        if old.exists():
            _remove(old)
        if out.exists():
            os.replace(out, old)
        os.replace(new, out)
    except OSError as exc:
        if exc.filename is None:
            raise _named(exc, out) from exc
        raise
    if old.exists():
        try:
            _remove(old)
        except OSError as exc:
            warnings.warn(
                f"the new results are in {out}, but the previous ones could not be deleted "
                f"from {old} ({describe_oserror(exc)}); delete it by hand",
                stacklevel=2,
            )
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


# --------------------------------------------------------------------------------------------
# The lock on an output folder
# --------------------------------------------------------------------------------------------

# flock errors that mean "not supported here" (some network file systems): the lock falls
# back to a lock file created with O_EXCL
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


class FolderLocked(FileExistsError):
    """Another process (a sweep, or a worker of one) holds the lock on an output folder."""


def lock_path(out: str | os.PathLike[str]) -> Path:
    """The lock file of the output folder ``out``: ``OUT.lock`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it; without a test, assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


class FolderLock:
    """An advisory lock on an output folder, held in ``OUT.lock`` beside it.

    Where ``fcntl.flock`` works, the lock belongs to the open file: processes that inherit the
    descriptor (the workers of a sweep, see :meth:`fileno`) hold it too, so it lasts until the
    last of them exits, and a killed process never leaves a stale lock. Where ``flock`` is
    missing or unsupported (Windows, some network file systems), the lock is the file itself,
    created with ``O_EXCL`` and holding ``host:pid``; a lock file left by a process of this host
    that no longer runs is taken over, one of another host is refused (its message says to
    delete it if no sweep runs there).

    Args:
        out: the output folder (it need not exist; its parent is created).

    Raises:
        FolderLocked: from :meth:`acquire`, when another process holds the lock.
        OSError: the lock file cannot be created (read-only or missing permission), naming it.
    """

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self.path = lock_path(out)
        self.fd: int | None = None
        self.mode: str | None = None

    def acquire(self) -> FolderLock:
        """Takes the lock (without waiting); returns ``self``."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _named(exc, self.path.parent) from exc
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None and self._flock(fcntl):
            return self
        self._exclusive()
        return self

    def _flock(self, fcntl: Any) -> bool:
        for _ in range(100):
            created = True
            try:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, file_mode())
                except FileExistsError:
                    created = False
                    fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:  # deleted between the two opens: try again
                continue
            except OSError as exc:
                raise _named(exc, self.path) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read_owner(self.path) or "another process"
                raise FolderLocked(
                    f"{self.out} is in use by another sweep (process {holder} holds "
                    f"{self.path}); wait for it to end, or stop it"
                ) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _NO_FLOCK:  # the O_EXCL lock file takes over
                    if created:
                        self.path.unlink(missing_ok=True)
                    return False
                raise _named(exc, self.path) from exc
            # the previous holder deletes the file when it lets go: lock the file that is there
            try:
                st, now = os.fstat(fd), os.stat(self.path)
                same = (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, (_owner() + "\n").encode())
            self.fd, self.mode = fd, "flock"
            return True
        raise FolderLocked(
            f"could not lock {self.path}: it keeps being replaced"
        )  # pragma: no cover

    def _exclusive(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
            except FileExistsError:
                holder = _read_owner(self.path)
                host, _, pid = holder.rpartition(":")
                if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                if host == socket.gethostname():
                    raise FolderLocked(
                        f"{self.out} is in use by another sweep (process {holder or '?'} holds "
                        f"{self.path}); wait for it to end, or stop it"
                    ) from None
                raise FolderLocked(
                    f"{self.out} is in use by a sweep on another machine ({holder or '?'} holds "
                    f"{self.path}); if no sweep runs there, delete {self.path}"
                ) from None
            except OSError as exc:
                raise _named(exc, self.path) from exc
            try:
                os.write(fd, (_owner() + "\n").encode())
            finally:
                os.close(fd)
            self.mode = "exclusive"
            return
        raise FolderLocked(f"could not take the lock {self.path}")  # pragma: no cover

    def fileno(self) -> int | None:
        """The locked descriptor (``flock`` mode), for worker processes to inherit; else None."""
        return self.fd

    def release(self) -> None:
        """Lets go of the lock and deletes the lock file (errors ignored: the lock is gone)."""
        if self.mode == "flock" and self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None
        elif self.mode == "exclusive" and _read_owner(self.path) == _owner():
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.mode = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
