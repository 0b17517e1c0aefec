"""The sweep: every method × batch size in two processes."""

import pytest

from metanorm_repro.experiments import (
    RunConfig,
    run_sweep,
)


def test_sweep_in_two_processes(tmp_path):
    base = RunConfig(epochs=1, n_per_class=10, threads=1)
    results = run_sweep(
        base,
        tmp_path / "s",
        methods=["none", "mdn-linear"],
        batch_sizes=[8, 6],
        progress=False,
        jobs=2,
    )
    assert [(r["final"]["batch_size"], r["final"]["method"]) for r in results] == [
        (8, "none"),
        (8, "mdn-linear"),
        (6, "none"),
        (6, "mdn-linear"),
    ]
    for r in results:
        assert (
            tmp_path
            / "s"
            / "runs"
            / f"bs{r['final']['batch_size']}"
            / r["final"]["method"]
            / "seed0"
            / "final.json"
        ).is_file()
    with pytest.raises(ValueError, match="jobs"):
        run_sweep(base, tmp_path / "t", jobs=0)
