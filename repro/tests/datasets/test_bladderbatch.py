"""bladderbatch: the loader, and batch removal on real data (skipped when not installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metanorm.metrics import grouped_distance_correlation_sqr
from metanorm.preprocessing import MetadataResidualizer
from metanorm_repro.datasets.bladderbatch import find_bladderbatch, load_bladderbatch

ROOT = Path(__file__).resolve().parents[3]


def test_missing_data_error_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get download r-bioc-bladderbatch"):
        load_bladderbatch(tmp_path)
    with pytest.raises(TypeError, match="path"):
        find_bladderbatch(3)  # type: ignore[arg-type]


def test_env_var_and_folder_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "bladderbatch" / "bladderdata.rda"
    f.parent.mkdir()
    f.write_bytes(b"")
    monkeypatch.setenv("METANORM_DATA", str(tmp_path))
    assert find_bladderbatch() == f
    assert find_bladderbatch(tmp_path) == f
    assert find_bladderbatch(f.parent) == f
    assert find_bladderbatch(f) == f


@pytest.fixture(scope="module")
def bb():  # type: ignore[no-untyped-def]
    pytest.importorskip("rdata", reason="rdata (the bladderbatch extra) is not installed")
    try:
        return load_bladderbatch()
    except FileNotFoundError as e:
        pytest.skip(f"bladderbatch is not installed (run `bash scripts/install-data.sh`): {e}")


def test_real_data_shape_and_design(bb) -> None:  # type: ignore[no-untyped-def]
    assert bb.expression.shape == (57, 22283)
    assert np.isfinite(bb.expression).all()
    assert bb.genes[0] == "1007_s_at" and len(set(bb.samples)) == 57
    table = pd.crosstab(bb.batch, bb.status)
    expected = {
        (1, "Cancer"): 11, (2, "Cancer"): 14, (2, "Normal"): 4, (3, "Normal"): 4,
        (4, "Biopsy"): 5, (5, "Biopsy"): 4, (5, "Cancer"): 15,
    }  # fmt: skip
    got = {
        (b, s): int(table.loc[b, s]) for b in table.index for s in table.columns if table.loc[b, s]
    }
    assert got == expected
    assert list(bb.metadata().columns) == ["batch", "status", "outcome"]


def test_residualizer_removes_batch_within_status(bb) -> None:  # type: ignore[no-untyped-def]
    genes = np.argsort(-bb.expression.var(axis=0))[:300]
    F = bb.expression[:, genes]
    meta = bb.metadata().reset_index(drop=True)
    res = MetadataResidualizer(keep=["status"], categorical=["batch", "status"])
    out = res.fit(F, metadata=meta[["batch", "status"]]).transform(F, metadata=meta[["batch"]])
    assert np.isfinite(out).all()
    # the 7 (batch, status) cells are saturated by batch + status: within a status, every batch
    # has the same mean expression after correction (before: far apart)
    for status, group in meta.groupby("status"):
        means = [out[g.index].mean(0) for _, g in group.groupby("batch")]
        raw = [F[g.index].mean(0) for _, g in group.groupby("batch")]
        spread = np.ptp(np.stack(means), axis=0).max()
        assert spread < 1e-8, status
        assert np.ptp(np.stack(raw), axis=0).max() > 0.5, status
    onehot = pd.get_dummies(meta["batch"]).to_numpy(dtype=float)
    before = grouped_distance_correlation_sqr(F, onehot, meta["status"].to_numpy())
    after = grouped_distance_correlation_sqr(out, onehot, meta["status"].to_numpy())
    for s in ("Cancer", "Normal", "Biopsy"):
        assert after[s] < 0.6 * before[s], (s, before[s], after[s])


def test_comparison_script_runs(bb) -> None:  # type: ignore[no-untyped-def]
    # the comparison's module (scripts/compare_bladderbatch.py runs its main)
    from metanorm_repro.experiments import bladderbatch as mod

    r = mod.compare(bb, genes=200, folds=3, repeats=1, methods=["none", "residualizer"])
    assert r["residualizer"]["bacc_mean"] > 0.85
    for s in ("Cancer", "Normal"):
        assert r["residualizer"]["dcor2_out_of_fold"][s] < r["none"]["dcor2_out_of_fold"][s]
    assert "MetadataResidualizer" in mod.to_markdown(r)


def test_the_study_equals_the_comparison(bb, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from metanorm.cli import main
    from metanorm_repro.experiments.bladderbatch import compare, to_markdown

    out = tmp_path / "bb"
    flags = ["--option", "genes=200", "--option", "folds=3", "--option", "repeats=1"]
    assert main(["reproduce", "bladderbatch", "--out", str(out), *flags, "--methods", "none"]) == 0
    got = json.loads((out / "results.json").read_text())["methods"]
    want = compare(bb, genes=200, folds=3, repeats=1, methods=["none"])
    for r in (got["none"], want["none"]):
        r.pop("seconds")
    assert got == json.loads(json.dumps(want))
    assert to_markdown(got) in (out / "report.md").read_text()


def test_the_study_resumes_with_the_same_numbers(bb, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import dataclasses
    import json

    from metanorm.cli import main
    from metanorm_repro.experiments import get_study, registry
    from metanorm_repro.experiments.bladderbatch import compare

    flags = ["--option", "genes=200", "--option", "folds=3", "--option", "repeats=1"]
    flags += ["--methods", "none", "residualizer", "--quiet"]
    out = tmp_path / "r"
    study = get_study("bladderbatch")
    calls: list[dict] = []

    def run_unit(settings, unit, folder):  # type: ignore[no-untyped-def]
        if len(calls) == 1 and not resuming:
            raise KeyboardInterrupt
        calls.append(unit)
        return study.run_unit(settings, unit, folder)

    resuming = False
    monkeypatch.setitem(
        registry._ENTRIES, study.name, dataclasses.replace(study, run_unit=run_unit)
    )
    assert main(["reproduce", "bladderbatch", "--out", str(out), *flags]) == 130
    assert not out.exists() and calls == [{"method": "none"}]
    resuming = True
    assert main(["reproduce", "bladderbatch", "--out", str(out), *flags, "--resume"]) == 0
    assert calls == [{"method": "none"}, {"method": "residualizer"}]  # "none" not run again

    got = json.loads((out / "results.json").read_text())["methods"]
    # the uninterrupted run: the study equals compare() (test_the_study_equals_the_comparison)
    want = compare(bb, genes=200, folds=3, repeats=1, methods=["none", "residualizer"])
    for r in (*got.values(), *want.values()):
        r.pop("seconds")
    assert got == json.loads(json.dumps(want))
    assert (out / "runs" / "residualizer" / "record.json").is_file()


def test_combat_refuses_a_batch_of_one_array() -> None:
    # with folds=3, a training fold can hold one of batch 3's four arrays: ComBat's variance
    # of that batch, and every corrected value, would be NaN
    pytest.importorskip("neuroCombat", reason="neuroCombat (the compare extra) is not installed")
    import numpy as np
    import pandas as pd

    from metanorm_repro.experiments.bladderbatch import fit_combat

    rng = np.random.default_rng(0)
    meta = pd.DataFrame({"batch": [1] * 5 + [2] * 5 + [3], "status": ["a", "b"] * 5 + ["a"]})
    with pytest.raises(ValueError, match=r"at least 2 per batch, got batch 3: 1; .*folds=5"):
        fit_combat(rng.normal(size=(11, 20)), meta)
    corrected = fit_combat(rng.normal(size=(10, 20)), meta[:10])(rng.normal(size=(4, 20)), meta[:4])
    assert np.isfinite(corrected).all()
