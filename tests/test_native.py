"""The optional compiled kernel metanorm_native behind metanorm._native (skipped without it)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from metanorm import _native

pytestmark = pytest.mark.skipif(
    not _native.available(), reason="metanorm_native is not built (make native)"
)


def _inputs(m, D, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(m, D, generator=g, dtype=dtype)
    A = torch.randn(m, K, generator=g, dtype=dtype)
    B = torch.randn(m, K, generator=g, dtype=dtype) / m
    return F, A, B


def _reference(F, A, B):
    F64, A64, B64 = F.double(), A.double(), B.double()
    P = B64.T @ F64
    return F64 - A64 @ P, P


# D: multiples of every vector width, and odd ones (tails); m = 1; K over the whole range
SHAPES = [(1, 7, 1), (1, 64, 3), (5, 33, 3), (17, 1000, 16), (40, 1029, 5), (64, 4096, 2)]


def test_api():
    assert _native.MAX_COLUMNS == 16
    assert _native.enabled()
    F = torch.zeros(3, 4)
    assert _native.applies(F, 16)
    assert _native.applies(F.double(), 1)
    assert not _native.applies(F, 17)
    assert not _native.applies(F, 0)
    assert not _native.applies(F.half(), 3)
    assert not _native.applies(F.to(torch.int64), 3)
    assert not _native.applies(F.to("meta"), 3)
    previous = _native.set_enabled(False)
    try:
        assert previous is True
        assert not _native.enabled()
        assert not _native.applies(F, 3)
        assert _native.available()
    finally:
        _native.set_enabled(previous)
    assert _native.applies(F, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("m", "D", "K"), SHAPES)
def test_values(m, D, K, dtype):
    F, A, B = _inputs(m, D, K, dtype)
    out, P = _native.low_rank_residual(F, A, B)
    ref_out, ref_P = _reference(F, A, B)
    assert out.shape == (m, D) and P.shape == (K, D)
    assert out.dtype == P.dtype == dtype
    assert out.is_contiguous() and P.is_contiguous()
    rtol = 2e-5 if dtype == torch.float32 else 1e-12
    # relative to the size of the terms (the residual itself may cancel to ~0)
    scale_out = (
        F.abs().double().max() + (A.abs().double() @ (B.T.abs().double() @ F.abs().double())).max()
    )
    scale_P = (B.T.abs().double() @ F.abs().double()).max()
    assert (out.double() - ref_out).abs().max() <= rtol * scale_out
    assert (P.double() - ref_P).abs().max() <= rtol * scale_P
    # the op through the dispatcher is the same function
    out2, P2 = torch.ops.metanorm.low_rank_residual(F, A, B)
    assert torch.equal(out, out2) and torch.equal(P, P2)
    # and so is the eager shortcut that skips the dispatcher
    out3, P3 = _native.low_rank_residual_fast(F, A, B)
    assert torch.equal(out, out3) and torch.equal(P, P3)


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
    reason="the default build uses OpenMP only on Linux against an OpenMP torch",
)
def test_built_with_openmp():
    # without -fopenmp, at::parallel_for in the extension is serial: the kernel would run on
    # one thread whatever torch.set_num_threads says
    from metanorm_native import _C

    assert _C.OPENMP is True


def test_same_result_on_any_number_of_threads():
    # each thread takes whole column chunks, so the split changes no sum
    F, A, B = _inputs(33, 5 * 1024 + 17, 5, torch.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, P1 = _native.low_rank_residual(F, A, B)
        torch.set_num_threads(2)
        out2, P2 = _native.low_rank_residual(F, A, B)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(out1, out2) and torch.equal(P1, P2)


def test_non_contiguous_and_offset_inputs():
    F, A, B = _inputs(30, 2 * 515, 4, torch.float32)
    Fv = F[:, ::2]  # non-contiguous
    Ft = torch.randn(515, 30).T  # transposed
    At = A.T.contiguous().T
    for features in (Fv, Ft, F[1:, 3:]):
        m = features.shape[0]
        out, P = _native.low_rank_residual(features, At[:m], B[:m])
        ref_out, ref_P = _reference(features, At[:m], B[:m])
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(P.double(), ref_P, rtol=1e-4, atol=1e-4)


OPCHECK_CASES = [
    (1, 7, 1, torch.float32),
    (5, 33, 3, torch.float64),
    (17, 130, 16, torch.float32),
    (9, 257, 16, torch.float64),
    (12, 96, 5, torch.float32),
]


@pytest.mark.parametrize(("m", "D", "K", "dtype"), OPCHECK_CASES)
def test_opcheck(m, D, K, dtype):
    F, A, B = _inputs(m, D, K, dtype)
    torch.library.opcheck(torch.ops.metanorm.low_rank_residual.default, (F, A, B))


def test_opcheck_non_contiguous():
    F, A, B = _inputs(6, 2 * 41, 3, torch.float32)
    torch.library.opcheck(
        torch.ops.metanorm.low_rank_residual.default, (F[:, ::2], A.T.contiguous().T, B)
    )


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        F = torch.empty(7, 123, dtype=torch.float64)
        A = torch.empty(7, 5, dtype=torch.float64)
        out, P = torch.ops.metanorm.low_rank_residual(F, A, A)
        assert out.shape == (7, 123) and P.shape == (5, 123)
        assert out.dtype == P.dtype == torch.float64
        assert out.device.type == "cpu"


def test_compile_fullgraph():
    def f(F, A, B):
        if _native.applies(F, A.shape[1]):
            out, P = _native.low_rank_residual(F, A, B)
        else:
            P = B.T @ F
            out = F - A @ P
        return 2 * out, P + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    F, A, B = _inputs(20, 300, 3, torch.float32)
    out, P = compiled(F, A, B)
    ref_out, ref_P = _reference(F, A, B)
    assert out.shape == (20, 300) and P.shape == (3, 300)
    torch.testing.assert_close(out.double(), 2 * ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(P.double(), ref_P + 1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K", [17, 32])
def test_refuses_too_many_columns(K):
    F, A, B = _inputs(4, 10, K, torch.float32)
    with pytest.raises(RuntimeError, match=r"K <= 16"):
        _native.low_rank_residual(F, A, B)


def test_refuses_bad_inputs():
    F, A, B = _inputs(4, 10, 3, torch.float32)
    with pytest.raises(RuntimeError, match="one dtype"):
        _native.low_rank_residual(F, A.double(), B)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _native.low_rank_residual(F.half(), A.half(), B.half())
    with pytest.raises(RuntimeError, match=r"\(m, K\)"):
        _native.low_rank_residual(F, A[:3], B[:3])


def _run(code):
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_without_the_kernel_import_is_silent():
    result = _run(
        """
        import sys
        sys.modules["metanorm_native"] = None  # as if it were not installed
        import metanorm._native as nat
        import torch
        assert not nat.available()
        assert nat.MAX_COLUMNS == 0
        assert not nat.applies(torch.zeros(2, 3), 1)
        try:
            nat.low_rank_residual(torch.zeros(2, 3), torch.zeros(2, 1), torch.zeros(2, 1))
        except RuntimeError as exc:
            assert "not available" in str(exc)
        else:
            raise AssertionError("expected RuntimeError")
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok" and result.stderr == ""


def test_broken_build_warns_once_on_use_only(tmp_path):
    broken = tmp_path / "metanorm_native"
    broken.mkdir()
    (broken / "__init__.py").write_text("")
    (broken / "_C.so").write_text("not a shared library")  # loads as a broken extension
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, warnings
                sys.path.insert(0, {str(tmp_path)!r})
                import importlib.machinery as m
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    import metanorm, metanorm._native as nat
                    assert not caught, [str(w.message) for w in caught]
                    assert not nat.available()
                    assert not nat.available() and nat.MAX_COLUMNS == 0
                assert len(caught) == 1, [str(w.message) for w in caught]
                assert caught[0].category is RuntimeWarning
                assert "cannot be loaded" in str(caught[0].message)
                print("ok")
                """
            ),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_import_is_silent_with_the_kernel():
    result = _run("import metanorm._native as nat; assert nat.available(); print('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok" and result.stderr == ""


def _update_both(running, beta, m, momentum, counters):
    """The update on the compiled op and on the PyTorch path, from the same state."""
    from metanorm.nn import functional as MF

    r1, c1 = running.clone(), [c.clone() for c in counters]
    r2, c2 = running.clone(), [c.clone() for c in counters]
    f1 = _native.running_update(r1, beta, m, momentum, *c1)
    previous = _native.set_enabled(False)
    try:
        f2 = MF.update_running_beta(
            r2,
            beta,
            m,
            momentum,
            num_batches_tracked=c2[0],
            num_samples_tracked=c2[1],
            num_batches_skipped=c2[2],
        )
    finally:
        _native.set_enabled(previous)
    return (r1, c1, f1), (r2, c2, f2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_update_matches_the_pytorch_update(dtype, momentum):
    g = torch.Generator().manual_seed(3)
    running = torch.zeros(5, 1031, dtype=dtype)
    counters = [torch.tensor(0), torch.tensor(0), torch.tensor(0)]
    for step, m in enumerate([64, 64, 3, 200, 64, 1, 64, 17]):
        beta = torch.randn(5, 1031, generator=g, dtype=dtype) * (step + 1)
        if step == 4:
            beta[2, 7] = float("nan")
        if step == 6:
            beta = beta.T.contiguous().T  # not contiguous
        (r1, c1, f1), (r2, c2, f2) = _update_both(running, beta, m, momentum, counters)
        assert f1.dtype == torch.bool and f1.shape == () and bool(f1) == bool(f2)
        assert [int(c) for c in c1] == [int(c) for c in c2]
        # the same operations in the same order; lerp may differ by its fused multiply-add
        scale = max(float(running.abs().max()), float(beta.nan_to_num().abs().max()))
        torch.testing.assert_close(r1, r2, rtol=0, atol=4 * torch.finfo(dtype).eps * scale)
        running, counters = r1, c1
    assert int(counters[2]) == 1 and int(counters[0]) == 7
    assert int(counters[1]) == 64 * 4 + 3 + 200 + 1 + 17 - 64


def test_running_update_overflowing_sum_is_not_finite():
    beta = torch.full((2, 40), 3e38, dtype=torch.float32)  # finite entries, sum overflows
    counters = [torch.tensor(1), torch.tensor(10), torch.tensor(0)]
    (r1, c1, f1), (r2, c2, f2) = _update_both(torch.ones(2, 40), beta, 10, 0.1, counters)
    assert not bool(f1) and not bool(f2)
    assert torch.equal(r1, torch.ones(2, 40)) and torch.equal(r2, r1)
    assert [int(c) for c in c1] == [int(c) for c in c2] == [1, 10, 1]


def test_running_update_bumps_versions():
    running, beta = torch.zeros(3, 40), torch.randn(3, 40)
    counters = [torch.tensor(0), torch.tensor(0), torch.tensor(0)]
    before = [t._version for t in (running, *counters)]
    _native.running_update_fast(running, beta, 8, 0.1, *counters)
    assert all(t._version > v for t, v in zip((running, *counters), before, strict=True))


def test_running_update_opcheck():
    running = torch.randn(3, 40)
    args = (running, torch.randn(3, 40), 8, 0.1, torch.tensor(2), torch.tensor(16), torch.tensor(0))
    torch.library.opcheck(torch.ops.metanorm.running_update.default, args)
    args = (
        running,
        torch.randn(3, 40),
        8,
        None,
        torch.tensor(2),
        torch.tensor(16),
        torch.tensor(0),
    )
    torch.library.opcheck(torch.ops.metanorm.running_update.default, args)


def test_running_update_refuses_bad_inputs():
    c = [torch.tensor(0), torch.tensor(0), torch.tensor(0)]
    r = torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match="one shape"):
        _native.running_update(r, torch.zeros(3, 5), 2, 0.1, *c)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _native.running_update(r, torch.zeros(3, 4, dtype=torch.float64), 2, 0.1, *c)
    with pytest.raises(RuntimeError, match="positive batch size"):
        _native.running_update(r, torch.zeros(3, 4), 0, 0.1, *c)
    with pytest.raises(RuntimeError, match="num_samples_tracked must be a CPU int64"):
        _native.running_update(r, torch.zeros(3, 4), 2, 0.1, c[0], torch.tensor(0.0), c[2])
    assert not _native.updates(r, torch.zeros(3, 4), c[0], None, c[2])
    assert not _native.updates(r.T, torch.zeros(4, 3), *c)
    assert _native.updates(r, torch.zeros(3, 4), *c)
