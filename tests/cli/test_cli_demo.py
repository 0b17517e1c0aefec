"""``metanorm demo``: runs, prints the layer's effect, refuses bad sizes."""

from metanorm.cli import main


def test_demo_runs_and_removes_the_confounder(capsys):
    assert main(["demo", "--n", "400", "--batch-size", "100"]) == 0
    out = capsys.readouterr().out
    assert "design columns ('y', 'c', 'intercept'), kept ['y']" in out
    rows = {line[:28].strip(): line[28:].split() for line in out.splitlines()[2:]}
    before = float(rows["features"][0])
    after = float(rows["MDN, eval (running beta)"][0])
    assert before > 0.5 and abs(after) < 0.1


def test_demo_bad_sizes(capsys):
    assert main(["demo", "--n", "5"]) == 2
    assert "--n >= 10" in capsys.readouterr().err
