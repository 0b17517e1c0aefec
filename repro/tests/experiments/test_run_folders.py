"""Run folders: atomic --overwrite, --resume, Ctrl-C/SIGTERM with worker processes, file modes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metanorm.cli import main
from metanorm_repro.experiments import RunConfig, _io, run_experiment, run_sweep
from metanorm_repro.experiments.runner import Run
from metanorm_repro.experiments.sweep import SweepInterrupted

BASE = RunConfig(epochs=2, n_per_class=10, threads=1, options={"n_eval_per_class": 5})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _interrupt_after(monkeypatch, epochs: int) -> None:
    """Ctrl-C (a KeyboardInterrupt) at the start of the (epochs + 1)-th epoch trained."""
    calls = {"n": 0}
    train = Run.train_epoch

    def train_epoch(self):
        calls["n"] += 1
        if calls["n"] > epochs:
            raise KeyboardInterrupt
        return train(self)

    monkeypatch.setattr(Run, "train_epoch", train_epoch)


def _finals(folder: Path) -> dict[str, dict]:
    return {
        str(p.parent.relative_to(folder)): json.loads(p.read_text())
        for p in sorted(folder.glob("runs/*/*/*/final.json"))
    }


def test_overwrite_keeps_the_previous_sweep_until_the_new_one_is_complete(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    reports: list[list[str]] = []

    def report(folder, results):
        _io.write_json(folder / "report.json", [r["final"]["method"] for r in results])
        reports.append([r["final"]["method"] for r in results])

    old = run_sweep(
        BASE, out, methods=["none", "mdn-linear"], batch_sizes=[8], progress=False, report=report
    )
    assert [r["out_dir"] for r in old] == [
        str(out / "runs/bs8/none/seed0"),
        str(out / "runs/bs8/mdn-linear/seed0"),
    ]
    before = _snapshot(out)
    assert "report.json" in before and "runs/bs8/mdn-linear/seed0/final.json" in before
    # a new sweep (other methods, two batch sizes) interrupted after its first group
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(SweepInterrupted) as info:
        run_sweep(
            BASE,
            out,
            methods=["none"],
            batch_sizes=[8, 6],
            overwrite=True,
            progress=False,
            report=report,
        )
    stop = info.value
    assert stop.folder == _io.partial_dir(out) and stop.total == 2 and stop.signal_name == "SIGINT"
    assert [r["final"]["batch_size"] for r in stop.results] == [8]
    assert reports[-1] == ["none"]  # the report of the completed runs, in OUT.partial
    assert json.loads((stop.folder / "report.json").read_text()) == ["none"]
    assert _snapshot(out) == before  # the previous sweep: intact, nothing of the new one
    # a plain new sweep is refused while the interrupted one is there
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="--resume"):
        run_sweep(BASE, out, methods=["none"], batch_sizes=[8, 6], progress=False)
    with pytest.raises(ValueError, match=r"methods \['none'\] \(asked: \['mdn-linear'\]\)"):
        run_sweep(
            BASE, out, methods=["mdn-linear"], batch_sizes=[8, 6], resume=True, progress=False
        )
    with pytest.raises(ValueError, match="epochs 2 \\(asked: 3\\)"):
        run_sweep(
            BASE.replace(epochs=3),
            out,
            methods=["none"],
            batch_sizes=[8, 6],
            resume=True,
            progress=False,
        )
    kept = (stop.folder / "runs/bs8/none/seed0/final.json").read_bytes()
    results = run_sweep(
        BASE.replace(threads=2),
        out,
        methods=["none"],
        batch_sizes=[8, 6],
        resume=True,
        progress=False,
        report=report,
    )
    # the new sweep replaced the old one whole: no run of the old sweep is left
    assert not _io.partial_dir(out).exists() and not (tmp_path / "sweep.old").exists()
    assert sorted(_finals(out)) == ["runs/bs6/none/seed0", "runs/bs8/none/seed0"]
    assert (out / "runs/bs8/none/seed0/final.json").read_bytes() == kept  # kept, not re-run
    assert json.loads((out / "report.json").read_text()) == ["none", "none"]
    assert json.loads((out / "sweep.json").read_text())["complete"] is True
    assert [r["out_dir"] for r in results] == [
        str(out / "runs/bs8/none/seed0"),
        str(out / "runs/bs6/none/seed0"),
    ]
    # the oracle: the same runs, never interrupted, with the same settings (bs8 kept from the
    # interrupted sweep at 1 thread, bs6 trained by the resumed sweep at 2 threads) give the same
    # bits; equal bits hold only for equal settings, so each run is compared with its own twin
    fresh8 = run_sweep(BASE, tmp_path / "f8", methods=["none"], batch_sizes=[8], progress=False)
    fresh6 = run_sweep(
        BASE.replace(threads=2), tmp_path / "f6", methods=["none"], batch_sizes=[6], progress=False
    )
    for a, b in zip(results, fresh8 + fresh6, strict=True):
        assert a["final"]["test_balanced_accuracy"] == b["final"]["test_balanced_accuracy"]
        assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    # across thread counts a reduction may round differently (measured: 1e-7 relative on an
    # AMD AVX2 machine): the same run at 1 thread agrees to a stated tolerance
    one = run_sweep(BASE, tmp_path / "f1", methods=["none"], batch_sizes=[6], progress=False)
    assert [h["train_loss"] for h in one[0]["history"]] == pytest.approx(
        [h["train_loss"] for h in results[1]["history"]], rel=1e-5
    )
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run_sweep(BASE, out, methods=["none"], batch_sizes=[8, 6], resume=True, progress=False)


def test_resume_restarts_the_unfinished_runs_of_a_group(tmp_path, monkeypatch):
    out = tmp_path / "s"
    _interrupt_after(monkeypatch, 3)  # epoch 2 of the second method: nothing finished
    with pytest.raises(SweepInterrupted) as info:
        run_sweep(BASE, out, methods=["none", "mdn-linear"], batch_sizes=[8], progress=False)
    assert info.value.results == [] and not out.exists()
    partial = _io.partial_dir(out) / "runs/bs8/mdn-linear/seed0"
    assert (partial / "epochs.csv").is_file() and not (partial / "final.json").exists()
    monkeypatch.undo()
    results = run_sweep(
        BASE, out, methods=["none", "mdn-linear"], batch_sizes=[8], resume=True, progress=False
    )
    assert [len(r["history"]) for r in results] == [2, 2]
    assert [h["epoch"] for h in results[1]["history"]] == [1, 2]


def test_swap_recovery(tmp_path):
    out, new, old = tmp_path / "o", tmp_path / "o.partial", tmp_path / "o.old"
    old.mkdir()
    (old / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    _io.recover_swap(out, lambda p: False)  # stopped between the renames, new one incomplete
    assert (out / "a").read_text() == "old" and not old.exists() and new.exists()
    os.replace(out, old)
    _io.recover_swap(out, lambda p: True)  # the new one was complete: it takes the place
    assert (out / "a").read_text() == "new" and not old.exists() and not new.exists()


def test_run_experiment_overwrite_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_experiment(BASE, out, progress=False)
    before = _snapshot(out)
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(BASE.replace(epochs=3), out, overwrite=True, progress=False)
    assert _snapshot(out) == before
    monkeypatch.undo()
    res = run_experiment(BASE.replace(epochs=3), out, overwrite=True, progress=False)
    assert res["out_dir"] == str(out) and len(res["history"]) == 3
    assert json.loads((out / "final.json").read_text())["epochs"] == 3
    assert not _io.partial_dir(out).exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_umask_mode(tmp_path, umask):
    previous = os.umask(umask)
    try:
        p = _io.write_json(tmp_path / "x.json", {"a": 1})
        q = tmp_path / "plain"
        q.write_text("")
    finally:
        os.umask(previous)
    assert p.stat().st_mode & 0o777 == q.stat().st_mode & 0o777 == 0o666 & ~umask


def test_cli_interrupt_and_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    args = [
        "reproduce",
        "synthetic",
        "--out",
        str(out),
        "--methods",
        "baseline",
        "--batch-sizes",
        "8",
        "6",
        "--n-per-class",
        "10",
        "--n-eval-per-class",
        "5",
        "--epochs",
        "2",
        "--jobs",
        "1",
        "--threads",
        "1",
        "--quiet",
        "--no-plots",
    ]
    monkeypatch.setattr(sys, "argv", ["metanorm", *args])
    _interrupt_after(monkeypatch, 2)
    assert main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted (SIGINT): 1 of 2 run units complete" in err[0]
    assert f"report of those: {_io.partial_dir(out) / 'report.md'}" in err[0]
    assert err[0].endswith(" ".join(["resume with: metanorm", *args, "--resume"]))
    assert (_io.partial_dir(out) / "report.md").is_file()
    partial = json.loads((_io.partial_dir(out) / "results.json").read_text())
    assert [r["batch_size"] for r in partial["rows"]] == [8]
    monkeypatch.undo()
    monkeypatch.setattr(sys, "argv", ["metanorm", *args, "--resume"])
    assert main([*args, "--resume"]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert sorted(r["batch_size"] for r in summary["rows"]) == [6, 8]
    assert (out / "report.md").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_sigterm_in_process(tmp_path, monkeypatch):
    """SIGTERM to a one-process sweep: the same stop as Ctrl-C, named SIGTERM."""
    calls = {"n": 0}
    train = Run.train_epoch

    def train_epoch(self):
        calls["n"] += 1
        if calls["n"] == 3:  # the second group's first epoch
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)  # the handler interrupts this
        return train(self)

    monkeypatch.setattr(Run, "train_epoch", train_epoch)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SweepInterrupted) as info:
        run_sweep(BASE, tmp_path / "t", methods=["none"], batch_sizes=[8, 6], progress=False)
    assert info.value.signal_name == "SIGTERM" and len(info.value.results) == 1
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize(("sig", "jobs"), [(signal.SIGINT, 2)], ids=["SIGINT-2jobs"])
def test_signal_stops_workers_writes_report_and_exits_130(tmp_path, sig, jobs):
    out = tmp_path / "sig"
    # two groups (in two workers, or one after the other): bs 40 finishes in about a second,
    # bs 1 would train for ~30 s
    cmd = [
        sys.executable,
        "-m",
        "metanorm",
        "reproduce",
        "synthetic",
        "--out",
        str(out),
        "--methods",
        "baseline",
        "--batch-sizes",
        "40",
        "1",
        "--n-per-class",
        "20",
        "--n-eval-per-class",
        "5",
        "--epochs",
        "8",
        "--jobs",
        str(jobs),
        "--threads",
        "1",
        "--quiet",
        "--no-plots",
    ]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = _io.partial_dir(out)
    # workers train in private folders under OUT.jobs; the main process moves finished runs in
    scratch = _io.scratch_dir(out)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (
        (partial / "runs/bs40/none/seed0/final.json").is_file()
        and list(scratch.glob("*/runs/bs1/none/seed0/epochs.csv"))
    ):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    assert list(scratch.glob("*/runs/bs1/none/seed0/epochs.csv")), "the sweep did not get going"
    workers = [c for c in _children(proc.pid) if _alive(c)]
    assert len(workers) >= (jobs if jobs > 1 else 0)  # the pool (and the resource tracker)
    print(f"signal after {time.monotonic() - started:.1f} s")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    print(f"exit after {time.monotonic() - started:.1f} s")
    assert "Traceback" not in stderr and "leaked" not in stderr
    name = "SIGINT" if sig == signal.SIGINT else "SIGTERM"
    last = stderr.strip().splitlines()[-1]
    assert f"interrupted ({name}): 1 of 2 run units complete" in last and last.endswith("--resume")
    # the workers are stopped: none alive, their private folders gone and not written again
    time.sleep(0.5)
    assert [c for c in workers if _alive(c)] == []
    assert not scratch.exists()
    time.sleep(2.0)
    assert not scratch.exists()
    assert not (partial / "runs/bs1/none/seed0").exists()
    report = json.loads((partial / "results.json").read_text())
    assert [r["batch_size"] for r in report["rows"]] == [40]
    assert not out.exists()
