"""Sweeps under real faults: a killed main process, two sweeps on one folder, read-only folders,
a full disk, corrupted run files.

Read-only folders are made with ``chmod`` when the tests do not run as root; root ignores file
modes, so then :func:`test_faults_in_a_mount_namespace` runs the same tests again in a user and
mount namespace (``unshare -rm``), with read-only bind mounts and a small tmpfs (skipped where
namespaces are not allowed).
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from test_run_folders import _interrupt_after

from metanorm.cli import main
from metanorm_repro.experiments import RunConfig, _io, run_sweep
from metanorm_repro.experiments import sweep as sweep_module
from metanorm_repro.experiments.runner import Run, RunCorrupted, load_result
from metanorm_repro.experiments.sweep import SweepInterrupted

BASE = RunConfig(epochs=2, n_per_class=10, threads=1, options={"n_eval_per_class": 5})
IN_NAMESPACE = os.environ.get("METANORM_TEST_MOUNT_NAMESPACE") == "1"


def _args(out: Path, *extra: str, sizes: tuple[str, ...] = ("8",), epochs: str = "2") -> list:
    return [
        "reproduce",
        "synthetic",
        "--out",
        str(out),
        "--methods",
        "baseline",
        "--batch-sizes",
        *sizes,
        "--n-per-class",
        "10",
        "--n-eval-per-class",
        "5",
        "--epochs",
        epochs,
        "--threads",
        "1",
        "--quiet",
        "--no-plots",
        *extra,
    ]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_kill_9_of_a_two_job_sweep_and_a_second_sweep_on_the_same_folder(tmp_path, capsys):
    """``kill -9`` of the main process: its workers die at once and nothing is written after.

    While the sweep runs, a second one on the same folder (plain, --overwrite, --resume, or
    run_sweep) is refused in one line. After the kill, the messages agree: a plain rerun points
    to --resume or --overwrite, and both work.
    """
    out = tmp_path / "k"
    # two groups in two workers: bs 40 finishes in about a second, bs 1 trains for several
    args = _args(out, sizes=("40", "1"), epochs="3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "metanorm", *args, "--jobs", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial, scratch = _io.partial_dir(out), _io.scratch_dir(out)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
            (partial / "runs/bs40/none/seed0/manifest.json").is_file()
            and list(scratch.glob("*/runs/bs1/none/seed0/epochs.csv"))
        ):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        assert (partial / "runs/bs40/none/seed0/manifest.json").is_file(), "no start in time"
        # the finished run was moved in by the main process; the running one is not there
        assert not (partial / "runs/bs1").exists()
        # a second sweep on the same folder is refused, whatever the flags
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert main(_args(out, *extra, sizes=("40", "1"), epochs="3")) == 2
            err = _one_line(capsys)
            assert f"{out} is in use by another sweep" in err and str(_io.lock_path(out)) in err
        with pytest.raises(_io.FolderLocked, match="in use by another sweep"):
            run_sweep(BASE, out, methods=["none"], batch_sizes=[8], overwrite=True, progress=False)
        workers = [c for c in _children(proc.pid) if _alive(c)]
        assert len(workers) >= 2
        assert proc.poll() is None, "the slow group finished before the kill"
        killed = time.monotonic()
        proc.kill()
        proc.wait(timeout=10)
        while [c for c in workers if _alive(c)] and time.monotonic() < killed + 5:
            time.sleep(0.05)
        assert [c for c in workers if _alive(c)] == []
        os.write(2, f"workers gone {time.monotonic() - killed:.2f} s after the kill\n".encode())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    before = _snapshot(partial), _snapshot(scratch)
    time.sleep(1.5)
    assert (_snapshot(partial), _snapshot(scratch)) == before  # nothing written after
    assert "runs/bs40/none/seed0/final.json" in before[0]
    assert not any(k.startswith("runs/bs1") for k in before[0])
    # consistent messages: a plain rerun points to --resume or --overwrite; both work
    assert main(_args(out, "--jobs", "1", sizes=("40", "1"), epochs="3")) == 2
    err = _one_line(capsys)
    assert "holds an interrupted sweep: pass --resume to continue it, or --overwrite" in err
    kept = (partial / "runs/bs40/none/seed0/final.json").read_bytes()
    assert main(_args(out, "--jobs", "1", "--resume", sizes=("40", "1"), epochs="3")) == 0
    assert (out / "runs/bs40/none/seed0/final.json").read_bytes() == kept
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert sorted(r["batch_size"] for r in rows) == [1, 40]
    assert not partial.exists() and not scratch.exists() and not _io.lock_path(out).exists()
    assert main(_args(out, "--jobs", "1", "--overwrite", sizes=("40",), epochs="3")) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [40]
    capsys.readouterr()


def test_lock_without_flock_uses_a_lock_file_with_stale_detection(tmp_path, monkeypatch):
    import fcntl
    import socket

    out = tmp_path / "o"
    with _io.FolderLock(out) as held:  # flock: a second lock on the folder is refused
        assert held.mode == "flock" and held.fileno() is not None
        with pytest.raises(_io.FolderLocked, match="in use by another sweep"):
            _io.FolderLock(out).acquire()
    assert not _io.lock_path(out).exists()

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)  # as on some network file systems
    first = _io.FolderLock(out).acquire()
    assert first.mode == "exclusive" and first.fileno() is None
    host = socket.gethostname()
    assert _io.lock_path(out).read_text().strip() == f"{host}:{os.getpid()}"
    with pytest.raises(_io.FolderLocked, match=f"process {host}:{os.getpid()}"):
        _io.FolderLock(out).acquire()
    first.release()
    assert not _io.lock_path(out).exists()
    # a lock file left by a process of this host that has ended is taken over
    dead = subprocess.Popen(["true"])
    dead.wait()
    _io.lock_path(out).write_text(f"{host}:{dead.pid}\n")
    taken = _io.FolderLock(out).acquire()
    assert _io.lock_path(out).read_text().strip() == f"{host}:{os.getpid()}"
    taken.release()
    # one of another machine cannot be judged: refused, saying what to do
    _io.lock_path(out).write_text("elsewhere.invalid:123\n")
    with pytest.raises(_io.FolderLocked, match=r"another machine.*delete"):
        run_sweep(BASE, out, methods=["none"], batch_sizes=[8], progress=False)
    assert not out.exists() and not _io.partial_dir(out).exists()


# --------------------------------------------------------------------------------------------
# Read-only folders and a full disk
# --------------------------------------------------------------------------------------------


@contextmanager
def _read_only(folder: Path):
    """``folder`` read-only: a read-only bind mount in the namespace, else ``chmod a-w``."""
    if IN_NAMESPACE:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        try:
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    if os.geteuid() == 0:
        pytest.skip("root ignores file modes (test_faults_in_a_mount_namespace runs this)")
    mode = folder.stat().st_mode & 0o777
    folder.chmod(0o555)
    try:
        yield
    finally:
        folder.chmod(mode)


@pytest.fixture(scope="module")
def _sweep_once(tmp_path_factory):
    """A complete one-run sweep (baseline, bs 8), made once and copied for each test."""
    out = tmp_path_factory.mktemp("made") / "out"
    assert main(_args(out, "--jobs", "1")) == 0
    return out


@pytest.fixture
def previous(_sweep_once, tmp_path, capsys):
    out = tmp_path / "parent" / "out"
    out.parent.mkdir()
    shutil.copytree(_sweep_once, out)
    capsys.readouterr()
    return out


def _no_training(monkeypatch) -> None:
    def train_epoch(self):
        raise AssertionError("trained although the folder cannot take the results")

    monkeypatch.setattr(Run, "train_epoch", train_epoch)


def test_read_only_output_folder(previous, monkeypatch, capsys):
    before = _snapshot(previous)
    _no_training(monkeypatch)
    with _read_only(previous):
        assert main(_args(previous, "--jobs", "1", "--overwrite")) == 2
    err = _one_line(capsys)
    assert f"error: {previous}: " in err
    assert "Read-only file system (EROFS)" in err or "Permission denied (EACCES)" in err
    assert _snapshot(previous) == before
    assert not _io.partial_dir(previous).exists() and not _io.lock_path(previous).exists()


def test_read_only_parent_before_and_at_the_swap(previous, monkeypatch, capsys):
    parent = previous.parent
    before = _snapshot(previous)
    with monkeypatch.context() as m:
        _no_training(m)
        with _read_only(parent):
            assert main(_args(previous, "--jobs", "1", "--overwrite")) == 2
        err = _one_line(capsys)
        assert f"error: {_io.lock_path(previous)}: " in err
    assert _snapshot(previous) == before
    # the parent turns read-only while the sweep trains: nothing is swapped half way
    finish = Run.finish
    stack = []

    def finish_then_read_only(self):
        result = finish(self)
        ctx = _read_only(parent)
        ctx.__enter__()
        stack.append(ctx)
        return result

    monkeypatch.setattr(Run, "finish", finish_then_read_only)
    try:
        assert main(_args(previous, "--jobs", "1", "--overwrite", epochs="1")) == 2
    finally:
        for ctx in stack:
            ctx.__exit__(None, None, None)
    err = _one_line(capsys)
    assert f"error: {parent}" in err and ("(EROFS)" in err or "(EACCES)" in err)
    assert _snapshot(previous) == before  # the previous results, intact
    assert not previous.with_name("out.old").exists()
    monkeypatch.undo()
    assert main(_args(previous, "--jobs", "1", "--resume", epochs="1")) == 0
    assert json.loads((previous / "runs/bs8/none/seed0/final.json").read_text())["epochs"] == 1
    assert not _io.partial_dir(previous).exists()
    assert not previous.with_name("out.old").exists()


def test_full_disk_is_found_before_training(previous, monkeypatch, capsys):
    before = _snapshot(previous)
    real = shutil.disk_usage

    def small(path):
        return real(path)._replace(free=1 << 20)

    monkeypatch.setattr(sweep_module.shutil, "disk_usage", small)
    _no_training(monkeypatch)
    assert main(_args(previous, "--jobs", "1", "--overwrite")) == 2
    err = _one_line(capsys)
    assert f"error: {_io.partial_dir(previous)}: not enough free space: about " in err
    assert "1 run(s), 1.0 MiB free (ENOSPC)" in err
    assert _snapshot(previous) == before and not _io.partial_dir(previous).exists()
    # the estimate bounds what a run writes, without being absurd
    config = BASE.replace(method="none", batch_size=8)
    estimate = sweep_module._run_bytes([config])["none"]
    run = previous / "runs/bs8/none/seed0"
    written = sum(p.stat().st_size for p in run.iterdir())
    assert written <= estimate <= 2 * written + sweep_module._RUN_EXTRA_BYTES


def test_no_space_while_writing_is_one_line_and_the_previous_results_stay(
    previous, monkeypatch, capsys
):
    before = _snapshot(previous)
    finish, state = Run.finish, {"full": False}
    fsync = os.fsync

    def finish_on_a_full_disk(self):
        state["full"] = True
        return finish(self)

    def full_fsync(fd):
        if state["full"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)

    monkeypatch.setattr(Run, "finish", finish_on_a_full_disk)
    monkeypatch.setattr(_io.os, "fsync", full_fsync)
    assert main(_args(previous, "--jobs", "1", "--overwrite")) == 2
    err = _one_line(capsys)
    run = _io.partial_dir(previous) / "runs/bs8/none/seed0"
    assert err.endswith(f"error: {run / 'checkpoint.pt'}: No space left on device (ENOSPC)"), err
    assert _snapshot(previous) == before
    assert not list(_io.partial_dir(previous).rglob("*.tmp"))  # no temporary file left


@pytest.mark.skipif(not IN_NAMESPACE, reason="needs a tmpfs (test_faults_in_a_mount_namespace)")
def test_a_real_full_tmpfs(tmp_path, monkeypatch, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "out"
        with monkeypatch.context() as m:
            _no_training(m)
            assert main(_args(out, "--jobs", "1")) == 2
        err = _one_line(capsys)
        assert f"error: {_io.partial_dir(out)}: not enough free space" in err
        # the estimate passed (a smaller run), the disk filled while training: the real ENOSPC
        monkeypatch.setattr(sweep_module, "_preflight", lambda *a: None)
        finish = Run.finish

        def fill_then_finish(self):
            with open(disk / "filler", "wb") as f, suppress(OSError):
                f.write(b"\0" * (4 << 20))
            return finish(self)

        monkeypatch.setattr(Run, "finish", fill_then_finish)
        assert main(_args(out, "--jobs", "1")) == 2
        err = _one_line(capsys)
        assert str(_io.partial_dir(out)) in err and err.endswith("(ENOSPC)"), err
        assert "enforce fail" not in err and not out.exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_faults_in_a_mount_namespace(tmp_path):
    """As root, the read-only and full-disk tests again, in a user and mount namespace."""
    if IN_NAMESPACE or os.geteuid() != 0:
        pytest.skip("runs only as root, outside the namespace")
    unshare = shutil.which("unshare")
    probe = tmp_path / "probe"
    probe.mkdir()
    ok = (
        unshare is not None
        and subprocess.run(
            [unshare, "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
            capture_output=True,
        ).returncode
        == 0
    )
    if not ok:
        pytest.skip("user and mount namespaces are not allowed here")
    env = dict(os.environ, METANORM_TEST_MOUNT_NAMESPACE="1")
    tests = [
        f"{__file__}::{name}"
        for name in (
            "test_read_only_output_folder",
            "test_read_only_parent_before_and_at_the_swap",
            "test_a_real_full_tmpfs",
        )
    ]
    done = subprocess.run(
        [unshare, "-rm", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout, done.stdout


# --------------------------------------------------------------------------------------------
# Corrupted run files
# --------------------------------------------------------------------------------------------


def test_corrupted_files_are_retrained_on_resume_and_refused_by_the_report(tmp_path, monkeypatch):
    out = tmp_path / "c"
    methods = ["none", "batchnorm", "mdn-linear"]
    _interrupt_after(monkeypatch, 6)  # the bs 8 group complete, the bs 6 one not
    with pytest.raises(SweepInterrupted) as info:
        run_sweep(BASE, out, methods=methods, batch_sizes=[8, 6], progress=False)
    monkeypatch.undo()
    first = {r["final"]["method"]: r["final"] for r in info.value.results}
    assert sorted(first) == sorted(methods)
    runs = _io.partial_dir(out) / "runs/bs8"
    # a random-byte checkpoint (same size), a truncated features file, an edited valid final.json
    checkpoint = runs / "none/seed0/checkpoint.pt"
    checkpoint.write_bytes(os.urandom(checkpoint.stat().st_size))
    features = runs / "batchnorm/seed0/test_features.npz"
    features.write_bytes(features.read_bytes()[: features.stat().st_size // 2])
    final = runs / "mdn-linear/seed0/final.json"
    edited = json.loads(final.read_text())
    edited["test_balanced_accuracy"] = 0.915
    final.write_text(json.dumps(edited, indent=2) + "\n")
    for path, problem in (
        (checkpoint, "SHA-256 differs"),
        (features, "bytes where the run wrote"),
        (final, "SHA-256 differs|bytes where the run wrote"),
    ):
        with pytest.raises(RunCorrupted, match=problem) as bad:
            load_result(path.parent)  # what the report reads: refused, naming the file
        assert bad.value.path == path and str(path) in str(bad.value)
    with pytest.warns(UserWarning) as caught:
        results = run_sweep(
            BASE, out, methods=methods, batch_sizes=[8, 6], resume=True, progress=False
        )
    named = " ".join(str(w.message) for w in caught)
    for path in (checkpoint, features, final):
        assert f"{path}: " in named
    assert "the unit runs again" in named
    again = {r["final"]["method"]: r["final"] for r in results if r["final"]["batch_size"] == 8}
    for m in methods:  # retrained: the same numbers as before the corruption
        assert again[m]["test_balanced_accuracy"] == first[m]["test_balanced_accuracy"]
        assert load_result(out / "runs/bs8" / m / "seed0") is not None


def test_a_file_changed_before_the_report_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "r"
    finish = Run.finish

    def finish_then_edit(self):
        result = finish(self)
        path = self.out / "final.json"
        path.write_text(path.read_text().replace('"epochs": 2', '"epochs": 3'))
        return result

    monkeypatch.setattr(Run, "finish", finish_then_edit)
    reports = []
    with pytest.raises(RunCorrupted, match=r"final\.json: its SHA-256 differs"):
        run_sweep(
            BASE,
            out,
            methods=["none"],
            batch_sizes=[8],
            progress=False,
            report=lambda folder, results: reports.append(results),
        )
    assert reports == [] and not out.exists()
