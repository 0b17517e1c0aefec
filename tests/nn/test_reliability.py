"""Reliability of the MDN layers: nothing silently wrong after bad data, casts or checkpoints.

One test per failure the layers must not hide: non-finite training batches are reported at
``eval()``/``state_dict()``/refit (never in the forward pass), kept columns never reach the
output, casts keep Σ⁻¹ and N, checkpoints of another design or with non-finite state are
refused, the refit refuses one-shot iterators and says how many rows each layer used, an
untrained layer warns when put to evaluation, PMDN's β stays finite, design rows that require a
gradient are refused, and a Gram that is not symmetric or not semi-definite gets its own message.
The last test injects faults at random (hypothesis) and counts the outcomes: every case is either
correct or a clear error, none silent.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from metanorm.design import Design
from metanorm.nn import (
    MetadataNorm,
    MetadataScaleNorm,
    MetadataSequential,
    PenaltyMetadataNorm,
    RecursiveMetadataNorm,
    SyncMetadataNorm,
    convert_metadata_norm,
)
from metanorm.nn.utils import refit_running_beta

N, K, D, C = 96, 3, 6, 2


def _design(n: int = N, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n, 1), generator=g).double()
    return torch.cat(
        [y, torch.rand(n, 1, generator=g, dtype=torch.float64) * 3 + y, torch.ones(n, 1)], 1
    )


DESIGN = _design()

BUILD = {
    "batch": lambda **kw: MetadataNorm(D, DESIGN, keep=[0], **kw),
    "channelwise": lambda **kw: MetadataNorm(C, DESIGN, keep=[0], channelwise=True, **kw),
    "recursive": lambda **kw: RecursiveMetadataNorm(D, K, keep=[0], forgetting=0.99, **kw),
    "penalty": lambda **kw: PenaltyMetadataNorm(D, K, keep=[0], lr=0.05, **kw),
    "scale": lambda **kw: MetadataScaleNorm(C, DESIGN, keep=[0], **kw),
}
NAMES = list(BUILD)


def _features(rows: torch.Tensor, seed: int, name: str = "batch") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name in ("channelwise", "scale"):
        base = torch.randn(len(rows), C, 3, generator=g, dtype=torch.float64)
        c = rows[:, 1, None, None]
        return (base * torch.exp(0.2 * c) + 0.7 * c).float()
    base = torch.randn(len(rows), D, generator=g, dtype=torch.float64)
    return (base + 0.7 * rows[:, 1:2] + 0.3 * rows[:, :1]).float()


def _train(layer: nn.Module, name: str, steps: int = 4, m: int = 24) -> nn.Module:
    layer.train()
    for step in range(steps):
        idx = torch.arange(step * m, (step + 1) * m) % N
        layer(_features(DESIGN[idx], step, name), DESIGN[idx].float())
    return layer


def _probe(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows = DESIGN[:10].float()
    return _features(DESIGN[:10], 50, name), rows


# ---------------------------------------------------------------------------- non-finite batches


@pytest.mark.parametrize("name", NAMES)
def test_skipped_batches_are_reported_at_eval_state_dict_and_refit_not_in_forward(name):
    layer = _train(BUILD[name](), name)
    x, rows = _probe(name)
    x[0, 0] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the forward pass reports nothing (no host sync)
        layer(x, rows)
    assert int(layer.num_batches_skipped) == 1
    with pytest.warns(RuntimeWarning, match=rf"{type(layer).__name__}.*1 training batch"):
        layer.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same count: reported once
        layer.state_dict()
        layer.train().eval()
    layer.train()
    model = nn.ModuleDict({"norm": layer})
    layer(x, rows)
    with pytest.warns(RuntimeWarning, match=r"at 'norm'.*2 training batch.*\(1 new\)"):
        model.state_dict()
    layer(x, rows)
    loader = [(_features(DESIGN[:48], 7, name), DESIGN[:48].float())]
    with pytest.warns(RuntimeWarning, match=r"3 training batch.*\(1 new\)"):
        refit_running_beta(layer, loader)
    assert int(layer.num_batches_skipped) == 0  # the refit restarts the counters


@pytest.mark.parametrize("name", NAMES)
def test_nan_or_inf_in_a_kept_column_at_evaluation_leaves_the_output_finite(name):
    layer = _train(BUILD[name](), name).eval()
    x, rows = _probe(name)
    want = layer(x, torch.cat([torch.zeros(10, 1), rows[:, 1:]], 1))
    for bad in (math.nan, math.inf):
        unknown = rows.clone()
        unknown[:, 0] = bad  # "label unknown"
        got = layer(x, unknown)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=0, rtol=0)


# ---------------------------------------------------------------------------- casts


def test_half_and_other_casts_keep_gram_inverse_float64_and_n_exact():
    n = 70_000  # more rows than float16 can count (65504)
    design = _design(n, seed=5)
    layer = MetadataNorm(D, design, keep=[0])
    ref = MetadataNorm(D, design, keep=[0])
    inverse = layer.gram_inverse.clone()
    layer.half()
    assert layer.gram_inverse.dtype == torch.float64 and torch.equal(layer.gram_inverse, inverse)
    assert layer.n_samples.dtype == torch.float64 and float(layer.n_samples) == n
    assert layer.running_beta.dtype == torch.float16  # the running β follows the cast
    rows = design[:64].float()
    x = _features(design[:64], 1)
    out = layer(x.half(), rows.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref(x.half().float(), rows), atol=0.02, rtol=0.01)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.double(), lambda m: m.float()):
        cast(layer)
        assert layer.gram_inverse.dtype == torch.float64 and float(layer.n_samples) == n
    rls = RecursiveMetadataNorm(D, K).half()
    assert rls.covariance.dtype == torch.float64 and rls.beta.dtype == torch.float16


# ---------------------------------------------------------------------------- checkpoints


def _named(design: torch.Tensor, names: tuple[str, ...]) -> Design:
    return Design(design.numpy(), names, keep=(0,))


def test_checkpoint_of_another_design_is_refused_naming_both_and_the_transfer_route():
    trained = _train(MetadataNorm(D, DESIGN, keep=[0]), "batch")
    state = trained.state_dict()
    other = _design(N, seed=11)  # same N, K and D: only the design differs
    with pytest.raises(ValueError, match=r"Gram matrices.*num_metadata=.*strict=False"):
        MetadataNorm(D, other, keep=[0]).load_state_dict(state)
    with pytest.raises(ValueError, match=r"number of design rows N.*checkpoint: 96.*: 95"):
        MetadataNorm(D, DESIGN[:95], keep=[0]).load_state_dict(state)
    with pytest.raises(ValueError, match=r"kept columns.*checkpoint: \[0\].*\[1\]"):
        MetadataNorm(D, DESIGN, keep=[1]).load_state_dict(state)
    named = _train(MetadataNorm(D, _named(DESIGN, ("y", "site", "one"))), "batch")
    with pytest.raises(ValueError, match=r"column names.*'site'.*'age'"):
        MetadataNorm(D, _named(DESIGN, ("y", "age", "one"))).load_state_dict(named.state_dict())
    # the same design, rebuilt: loads; a layer without a design takes any checkpoint
    MetadataNorm(D, DESIGN.clone(), keep=[0]).load_state_dict(state)
    empty = MetadataNorm(D, num_metadata=K)
    empty.load_state_dict(named.state_dict())
    assert empty.columns == ("y", "site", "one")
    # the transfer route: drop the design buffers, keep this layer's design
    mine = MetadataNorm(D, other, keep=[0])
    inverse = mine.gram_inverse.clone()
    weights = {
        k: v for k, v in state.items() if k not in ("gram_inverse", "n_samples", "remove_mask")
    }
    mine.load_state_dict(weights, strict=False)
    assert torch.equal(mine.gram_inverse, inverse)
    torch.testing.assert_close(mine.running_beta, trained.running_beta, atol=0, rtol=0)


def test_gram_is_compared_to_a_relative_1e_9():
    layer = MetadataNorm(D, DESIGN, keep=[0])
    state = layer.state_dict()
    for rel, ok in ((1e-12, True), (1e-10, True), (1e-7, False)):
        changed = dict(state)
        changed["gram_inverse"] = state["gram_inverse"] * (1 + rel)
        target = MetadataNorm(D, DESIGN, keep=[0])
        if ok:
            target.load_state_dict(changed)
        else:
            with pytest.raises(ValueError, match="Gram matrices"):
                target.load_state_dict(changed)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("batch", "running_beta"),
        ("batch", "gram_inverse"),
        ("recursive", "beta"),
        ("recursive", "covariance"),
        ("penalty", "beta"),
    ],
)
def test_non_finite_state_in_a_checkpoint_is_refused(name, key):
    state = _train(BUILD[name](), name).state_dict()
    state[key] = state[key].clone()
    state[key].view(-1)[0] = math.nan
    with pytest.raises(ValueError, match=rf"refusing to load {key}.*1 NaN or infinite entry"):
        BUILD[name]().load_state_dict(state)
    empty = {"batch": lambda: MetadataNorm(D, num_metadata=K)}.get(name, BUILD[name])
    with pytest.raises(ValueError, match="refusing to load"):
        empty().load_state_dict(state)


# ---------------------------------------------------------------------------- refit


def test_refit_refuses_a_one_shot_iterator_and_reports_rows_per_layer():
    torch.manual_seed(0)
    model = MetadataSequential(
        nn.Linear(3, 4),
        MetadataNorm(4, DESIGN, keep=[0]),
        nn.Linear(4, 4),
        MetadataNorm(4, DESIGN, keep=[0]),
    )
    batches = [(torch.randn(40, 3), DESIGN[i : i + 40].float()) for i in (0, 40)]
    with pytest.raises(TypeError, match=r"one-shot generator.*list\(loader\)"):
        refit_running_beta(model, (b for b in batches))
    with pytest.raises(TypeError, match="one-shot"):
        refit_running_beta(model, iter(batches))
    before = [model[1].running_beta.clone(), model[3].running_beta.clone()]
    assert torch.equal(model[1].running_beta, before[0])
    result = refit_running_beta(model, batches)
    assert result == 2 and isinstance(result, int)
    assert result.samples == {"1": 80, "3": 80}

    class Shrinking:
        """An iterable that loses a batch on every pass (a consumed source)."""

        def __init__(self) -> None:
            self.left = list(batches) * 2

        def __iter__(self):
            out, self.left = self.left, self.left[1:]
            return iter(out)

    with pytest.raises(RuntimeError, match="different numbers of rows"):
        refit_running_beta(model, Shrinking())


# ---------------------------------------------------------------------------- untrained layers


@pytest.mark.parametrize("name", NAMES)
def test_a_layer_evaluated_without_training_warns_once_at_eval_not_in_forward(name):
    layer = BUILD[name]()
    with pytest.warns(UserWarning, match="never trained"):
        layer.eval()
    x, rows = _probe(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x, rows)
        layer.train().eval()  # once
    untrained = BUILD[name]().state_dict()
    with pytest.warns(UserWarning, match="never trained"):
        BUILD[name]().load_state_dict(untrained)
    trained = _train(BUILD[name](), name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained.eval()
        BUILD[name]().load_state_dict(trained.state_dict())


def test_a_converted_models_lazy_layer_warns_at_eval():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    model = convert_metadata_norm(net, DESIGN, replace=[nn.BatchNorm1d], keep=())
    with pytest.warns(UserWarning, match="never trained"):
        model.eval()


# ---------------------------------------------------------------------------- PMDN, rows, Gram


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_penalty_beta_stays_finite_when_its_step_diverges(optimizer):
    layer = PenaltyMetadataNorm(D, K, lr=1e3 if optimizer == "sgd" else 1e37, optimizer=optimizer)
    rows = (DESIGN[:32] * 100).float()
    for step in range(40):
        layer(_features(DESIGN[:32], step) * 1e3, rows)
    assert torch.isfinite(layer.beta).all()
    assert torch.isfinite(layer.exp_avg).all() and torch.isfinite(layer.exp_avg_sq).all()
    assert int(layer.num_batches_skipped) > 0
    assert int(layer.num_batches_skipped) + int(layer.num_batches_tracked) == 40


@pytest.mark.parametrize("name", NAMES)
def test_design_rows_that_require_grad_are_refused_with_a_clear_error(name):
    layer = BUILD[name]()
    x, rows = _probe(name)
    with pytest.raises(ValueError, match=r"requires_grad=True.*metadata.detach\(\)"):
        layer(x, rows.requires_grad_())
    with torch.no_grad():
        layer(x, rows)  # no gradient asked: accepted


def test_from_design_statistics_names_a_non_symmetric_or_indefinite_gram():
    gram = DESIGN.T @ DESIGN
    bent = gram.clone()
    bent[0, 1] += 1.0
    with pytest.raises(ValueError, match=r"expected gram to be symmetric.*\(0, 1\)"):
        SyncMetadataNorm.from_design_statistics(D, bent, N)
    indefinite = torch.diag(torch.tensor([4.0, 1.0, -0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"positive semi-definite.*-0\.5") as info:
        SyncMetadataNorm.from_design_statistics(D, indefinite, N)
    assert "collinear" not in str(info.value)
    # a valid Gram still builds the layer of the whole design
    layer = SyncMetadataNorm.from_design_statistics(D, gram, N, keep=[0])
    torch.testing.assert_close(layer.gram_inverse, MetadataNorm(D, DESIGN, keep=[0]).gram_inverse)


# ---------------------------------------------------------------------------- fault injection

FAULTS = [
    "nan_feature",
    "inf_feature",
    "nan_metadata",
    "overflow",
    "kept_nan_eval",
    "half",
    "other_design",
    "nan_checkpoint",
    "grad_rows",
    "one_shot_refit",
]
counts: dict[str, int] = {}


def _tally(key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.sampled_from(NAMES), st.sampled_from(FAULTS), st.integers(0, 2**16), st.integers(0, 9))
def test_injected_faults_are_correct_or_a_clear_error_never_silent(name, fault, seed, where):
    _tally("cases")
    layer = _train(BUILD[name](), name, steps=2)
    x, rows = _probe(name)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if fault in ("nan_feature", "inf_feature", "nan_metadata", "overflow"):
                if fault == "nan_metadata":
                    rows[where % 10, 1] = math.nan
                else:
                    x.view(-1)[where] = {
                        "nan_feature": math.nan,
                        "inf_feature": math.inf,
                        "overflow": 3e38,
                    }[fault]
                    if fault == "overflow":
                        x.view(-1)[where + 1] = 3e38
                layer(x, rows)
                layer.eval()
                skipped = int(layer.num_batches_skipped)
                reported = any("skipped" in str(w.message) for w in caught)
                assert skipped == 0 or reported, "skipped without a report"
                state = layer.state_dict()
                assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
                if fault != "overflow":  # 3e38 features are finite data: their estimate may count
                    # the state kept its value, the skipped batch was counted and reported
                    assert skipped == 1
                    for key, value in state.items():
                        if key != "num_batches_skipped" and key in before:
                            torch.testing.assert_close(value, before[key])
                    assert torch.isfinite(layer(*_probe(name))).all()
            elif fault == "kept_nan_eval":
                layer.eval()
                rows[:, 0] = math.nan
                assert torch.isfinite(layer(x, rows)).all()
            elif fault == "half":
                layer.half()
                for key in ("gram_inverse", "covariance", "n_samples"):
                    if key in before:
                        assert getattr(layer, key).dtype == torch.float64
                        assert torch.equal(getattr(layer, key), before[key])
                assert torch.isfinite(layer(x.half(), rows.half())).all()
            elif fault == "other_design":
                state = dict(before)
                if "gram_inverse" not in state:  # no design to compare
                    _tally("not applicable")
                    return
                state["gram_inverse"] = MetadataNorm(D, _design(N, seed=1000 + seed)).gram_inverse
                BUILD[name]().load_state_dict(state)
                raise AssertionError("another design's checkpoint loaded")
            elif fault == "nan_checkpoint":
                state = {k: v.clone() for k, v in before.items()}
                key = next(k for k in ("running_beta", "beta") if k in state)
                state[key].view(-1)[where % state[key].numel()] = math.nan
                BUILD[name]().load_state_dict(state)
                raise AssertionError("a NaN state loaded")
            elif fault == "grad_rows":
                layer(x, rows.requires_grad_())
                raise AssertionError("rows with requires_grad accepted")
            else:
                refit_running_beta(layer, ((x, rows) for _ in range(2)))
                raise AssertionError("a one-shot iterator refitted")
    except (ValueError, TypeError) as exc:
        assert str(exc).strip()
        _tally("clear error")
        _tally(f"{fault}: clear error")
        return
    _tally("correct")
    _tally(f"{fault}: correct")


def test_zz_report_fault_counts(capsys):
    """Prints the fault-injection counts (cases / clear errors / correct; silent fails a test)."""
    with capsys.disabled():
        print(f"\nreliability fault cases: {dict(sorted(counts.items()))}")
    if counts:
        assert counts.get("clear error", 0) >= 5 and counts.get("correct", 0) >= 5, counts
        outcomes = ("clear error", "correct", "not applicable")
        assert counts["cases"] == sum(counts.get(k, 0) for k in outcomes), counts
