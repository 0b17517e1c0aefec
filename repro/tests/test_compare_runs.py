"""scripts/compare_runs.py: the before/after oracle of a refactor finds every changed number."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_runs.py"
spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def _write(root: Path, final: dict) -> None:
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "final.json").write_text(json.dumps(final))


def test_times_are_ignored_and_any_other_number_counts(tmp_path, capsys):
    a = {"test_bacc": 0.8325, "dcor2": {"0": 0.1, "1": -0.02}, "epoch_time_s_median": 1.5}
    _write(tmp_path / "before" / "x", a)
    _write(tmp_path / "same" / "x", {**a, "epoch_time_s_median": 9.0})
    _write(tmp_path / "changed" / "x", {**a, "dcor2": {"0": 0.1, "1": -0.0200001}})
    assert compare_runs.main([str(tmp_path / "before"), str(tmp_path / "same"), "x"]) == 0
    assert "3 numbers compared, 0 differences" in capsys.readouterr().out
    assert compare_runs.main([str(tmp_path / "before"), str(tmp_path / "changed"), "x"]) == 1
    out = capsys.readouterr().out
    assert "1 differences" in out and "dcor2.1: -0.02 vs -0.0200001" in out
