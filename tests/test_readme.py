"""The README's quick start runs as written, eagerly, and does what its comments say."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _quick_start() -> str:
    text = README.read_text()
    block = text.split("<!-- quick-start -->", 1)[1].split("<!-- /quick-start -->", 1)[0]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def test_quick_start_runs_eagerly_and_removes_cf():
    code = _quick_start()
    # the first result comes without compiling: torch.compile is a second, optional step
    assert "torch.compile" not in code
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    model, logits, design = scope["model"], scope["logits"], scope["design"]
    assert logits.shape == (8, 1) and torch.isfinite(logits).all()
    assert not model.training
    layer = model[1]
    assert list(design.keep) == [0] and design.columns == ("y", "cf", "intercept")
    # the running β was refitted: the features after the layer carry no linear cf effect (the
    # oracle: least squares of the layer's output on the design, over the whole training set)
    with torch.no_grad():
        before = model[0](scope["inputs"])
        after = layer(before, scope["X"])
    X = scope["X"].double()
    b0 = torch.linalg.lstsq(X, before.double()).solution
    b1 = torch.linalg.lstsq(X, after.double()).solution
    assert b0[1].abs().max() > 0.01  # cf enters the features (measured: 0.075 at most)
    assert b1[1].abs().max() < 1e-4 * b0[1].abs().max()  # and is removed (measured: 2e-7 of it)
    torch.testing.assert_close(b1[0], b0[0], rtol=1e-4, atol=1e-6)  # the label's effect is kept


@pytest.mark.parametrize("text", ["make run", "make test"])
def test_readme_gives_the_two_commands(text):
    assert text in README.read_text()
