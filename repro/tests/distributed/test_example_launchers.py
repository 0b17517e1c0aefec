"""The harness's DDP examples under their launchers, 2 CPU processes each: torchrun
(examples/ddp_synthetic.py) and Accelerate (examples/accelerate_synthetic.py), against one process
over the union batches. The launch helpers are the library's (tests/distributed/test_launchers.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests" / "distributed"))
from _spawn import requires_gloo
from test_launchers import EXAMPLES, _assert_same_state, _load_example, _run, _torchrun

pytestmark = requires_gloo

# --------------------------------------------------------------------------------------------
# torchrun
TINY = [
    "--n-per-class",
    "16",
    "--n-eval-per-class",
    "8",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--optimizer",
    "sgd",  # the comparison below is to rounding; Adam's first steps would magnify it
    "--lr",
    "0.05",
]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("script", ["ddp_synthetic", "accelerate_synthetic"])
def test_torchrun_script_matches_one_process(tmp_path, script):
    """examples/ddp_synthetic.py (plain DDP) and examples/accelerate_synthetic.py (Accelerate)."""
    if script == "accelerate_synthetic":
        pytest.importorskip("accelerate", reason="needs accelerate (metanorm[accelerate])")
    work = tmp_path / "work"
    work.mkdir()
    _run(
        [
            *_torchrun(),
            "--standalone",
            "--nproc-per-node",
            "2",
            str(EXAMPLES / f"{script}.py"),
            "--out",
            "run",
            "--timeout",
            "30",
            *TINY,
        ],
        cwd=work,
    )
    # rank 0 wrote the run folder, and nothing else was written (no rank-1 or temporary files)
    assert _files(work) == ["run", "run/config.json", "run/metrics.json", "run/model.pt"]
    config = json.loads((work / "run" / "config.json").read_text())
    assert config["world_size"] == 2 and config["per_process_batch"] == 8
    metrics = json.loads((work / "run" / "metrics.json").read_text())
    assert metrics["max_rank_difference"] == 0.0  # every parameter and buffer agree across ranks

    # one process over the same global batches
    example = _load_example(script)
    assert example.main(["--out", str(tmp_path / "one"), *TINY]) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    ddp_state = torch.load(work / "run" / "model.pt")
    one_state = torch.load(tmp_path / "one" / "model.pt")
    assert any(k.endswith("running_beta") for k in ddp_state)
    _assert_same_state(ddp_state, one_state)
    for h2, h1 in zip(metrics["history"], one["history"], strict=True):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
    assert metrics["test_bacc"] == pytest.approx(one["test_bacc"], abs=1e-12)
    for c, v in one["test_dcor2_by_class"].items():
        assert metrics["test_dcor2_by_class"][c] == pytest.approx(v, abs=1e-4)
