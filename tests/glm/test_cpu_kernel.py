"""The compiled CPU kernel (metanorm._C) against plain PyTorch matrix products.

Oracle: the same maths as two float64 matrix products, ``Bᵀ F`` and ``F − A (Bᵀ F)``; the layer's
training map against the fallback path (kernel switched off) and against autograd.
"""

import os
import subprocess
import sys

import pytest
import torch

from metanorm import glm
from metanorm.nn import MetadataNorm

needs_kernel = pytest.mark.skipif(
    not glm.has_cpu_kernel(), reason="compiled CPU kernel not built (see setup.py)"
)


def test_kernel_is_built_where_expected():
    # `make test` builds it and sets METANORM_EXPECT_KERNEL=1, so a silent fallback shows here
    if os.environ.get("METANORM_EXPECT_KERNEL") != "1":
        pytest.skip("METANORM_EXPECT_KERNEL is not set")
    assert glm.has_cpu_kernel()


def _oracle(f, a, b):
    p = b.double().T @ f.double()
    return f.double() - a.double() @ p, p


SHAPES = [
    (1, 1, 1),  # one sample, one feature
    (7, 5, 2),  # fewer columns than one vector: the scalar tail only
    (200, 84, 3),  # the small benchmark shape: vectors plus a tail
    (33, 1030, 4),  # several column chunks with a tail
    (64, 256, 5),  # 5..8 columns: 2-vector tiles
    (50, 96, 16),  # the widest design the kernel takes
    (40, 80, 17),  # beyond it: the PyTorch path
]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("m", "d", "k"), SHAPES)
def test_low_rank_residual_matches_matrix_products(m, d, k, dtype):
    g = torch.Generator().manual_seed(m * 1000 + d + k)
    f = torch.randn(m, d, generator=g, dtype=dtype)
    a = torch.randn(m, k, generator=g, dtype=dtype)
    b = torch.randn(m, k, generator=g, dtype=dtype) / m
    out, p = glm.low_rank_residual(f, a, b)
    ref_out, ref_p = _oracle(f, a, b)
    assert out.dtype == p.dtype == dtype
    assert out.shape == (m, d) and p.shape == (k, d)
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    scale = ref_out.abs().max().item()
    assert (out.double() - ref_out).abs().max().item() <= tol * scale
    assert (p.double() - ref_p).abs().max().item() <= tol * max(ref_p.abs().max().item(), 1.0)


class _CountingKernel:
    """Stands in for ``metanorm._C`` and counts the calls that reach it."""

    def __init__(self, real):
        self.real, self.calls = real, []
        self.MAX_COLUMNS = real.MAX_COLUMNS

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
            return getattr(self.real, name)(*args, **kwargs)

        return call


@pytest.fixture
def counting_kernel(monkeypatch):
    spy = _CountingKernel(glm._C)
    monkeypatch.setattr(glm, "_C", spy)
    return spy


@needs_kernel
def test_kernel_and_fallback_agree_and_kernel_is_used(counting_kernel):
    g = torch.Generator().manual_seed(1)
    f = torch.randn(128, 4096 + 3, generator=g)
    a, b = torch.randn(128, 3, generator=g), torch.randn(128, 3, generator=g) / 128
    out_k, p_k = glm.low_rank_residual(f, a, b)
    assert counting_kernel.calls == ["low_rank_residual"]
    previous = glm.set_cpu_kernel(False)
    try:
        assert not glm.has_cpu_kernel()
        out_t, p_t = glm.low_rank_residual(f, a, b)
    finally:
        glm.set_cpu_kernel(previous)
    assert counting_kernel.calls == ["low_rank_residual"]  # the fallback did not call it
    torch.testing.assert_close(out_k, out_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_k, p_t, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(2)
    f = torch.randn(100, 60, generator=g, dtype=torch.float64).T  # (60, 100), transposed view
    a = torch.randn(3, 60, generator=g, dtype=torch.float64).T
    b = torch.randn(3, 60, generator=g, dtype=torch.float64).T / 60
    out, p = glm.low_rank_residual(f, a, b)
    ref_out, ref_p = _oracle(f, a, b)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(p, ref_p)


def _design(n=300, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64)
    x[:, -1] = 1.0
    return x


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_residual_kernel_vs_fallback(dtype):
    x = _design()
    kernel = glm.glm_kernel(x)
    mask = torch.tensor([False, True, True, True])
    rows = x[:50].to(dtype)
    f = torch.randn(50, 130, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 130, dtype=dtype)
    out_k, beta_k, total_k = glm.batch_residual_checked(f, rows, kernel, 300, mask)
    (grad_k,) = torch.autograd.grad(out_k, f, w)
    previous = glm.set_cpu_kernel(False)
    try:
        out_t, beta_t, total_t = glm.batch_residual_checked(f, rows, kernel, 300, mask)
        (grad_t,) = torch.autograd.grad(out_t, f, w)
    finally:
        glm.set_cpu_kernel(previous)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(out_k, out_t, **tol)
    torch.testing.assert_close(beta_k, beta_t, **tol)
    torch.testing.assert_close(grad_k, grad_t, **tol)
    assert not beta_k.requires_grad
    expected_total = beta_t.double().sum().item() + rows.double().sum().item()
    assert total_k == pytest.approx(expected_total, rel=1e-5, abs=1e-6)
    assert total_t == pytest.approx(expected_total, rel=1e-12, abs=1e-9)


@needs_kernel
def test_batch_residual_total_flags_non_finite():
    x = _design()
    kernel = glm.glm_kernel(x)
    mask = torch.tensor([False, True, True, True])
    rows = x[:20].clone()
    f = torch.randn(20, 40, dtype=torch.float64)
    f[3, 7] = float("nan")
    assert not torch.isfinite(
        torch.tensor(glm.batch_residual_checked(f, rows, kernel, 300, mask)[2])
    )
    f[3, 7] = 0.0
    rows[5, 0] = float("inf")  # a kept column: not subtracted, but the estimate sees it
    assert not torch.isfinite(
        torch.tensor(glm.batch_residual_checked(f, rows, kernel, 300, mask)[2])
    )


@needs_kernel
def test_gradcheck_and_double_backward_through_the_kernel():
    x = _design(k=3)
    kernel = glm.glm_kernel(x)
    mask = torch.tensor([False, True, True])
    rows = x[:11]
    f = torch.randn(11, 37, dtype=torch.float64, requires_grad=True)  # 37: vectors and a tail

    def fn(t):
        return glm.batch_residual(t, rows, kernel, 300, mask)[0]

    assert torch.autograd.gradcheck(fn, (f,))
    assert torch.autograd.gradgradcheck(fn, (f,))


@needs_kernel
def test_wide_designs_and_gpu_style_inputs_take_the_pytorch_path(counting_kernel):
    f = torch.randn(20, 40)
    glm.low_rank_residual(f, torch.randn(20, 17), torch.randn(20, 17))  # K > 16
    glm.low_rank_residual(f.half(), torch.randn(20, 3).half(), torch.randn(20, 3).half())
    assert counting_kernel.calls == []


@needs_kernel
def test_kernel_rejects_what_it_cannot_do():
    f = torch.randn(20, 40)
    with pytest.raises(RuntimeError, match="1 <= K <= 16"):
        glm._C.low_rank_residual(f, torch.randn(20, 17), torch.randn(20, 17))
    with pytest.raises(RuntimeError, match="contiguous"):
        glm._C.low_rank_residual(f.T, torch.randn(40, 3), torch.randn(40, 3))


@needs_kernel
def test_layer_training_step_kernel_vs_fallback(counting_kernel):
    x = _design(n=400, k=3)
    torch.manual_seed(3)
    layer_k = MetadataNorm(18432 // 64, x.float(), keep=[0], momentum=None)
    layer_t = MetadataNorm(18432 // 64, x.float(), keep=[0], momentum=None)
    inp = torch.randn(200, 18432 // 64, requires_grad=True)
    rows = x[:200].float()
    out_k = layer_k(inp, rows)
    (g_k,) = torch.autograd.grad(out_k.square().sum(), inp)
    assert counting_kernel.calls == ["batch_residual"]  # forward and backward in C++
    previous = glm.set_cpu_kernel(False)
    try:
        out_t = layer_t(inp, rows)
        (g_t,) = torch.autograd.grad(out_t.square().sum(), inp)
    finally:
        glm.set_cpu_kernel(previous)
    torch.testing.assert_close(out_k, out_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_k, g_t, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer_k.running_beta, layer_t.running_beta, rtol=1e-5, atol=1e-6)


def test_set_cpu_kernel_without_a_build(monkeypatch):
    monkeypatch.setattr(glm, "_C", None)
    with pytest.raises(RuntimeError, match="not built"):
        glm.set_cpu_kernel(True)


_IMPORT_WITH = """
import importlib.abc, sys, warnings
class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "metanorm._C":
            raise {error}("{message}")
        return None
sys.meta_path.insert(0, Finder())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import metanorm.glm as glm
print(glm.has_cpu_kernel(), any("does not load" in str(w.message) for w in caught))
"""


@pytest.mark.parametrize(
    ("error", "message", "warned"),
    [
        ("ModuleNotFoundError", "No module named 'metanorm._C'", "False"),  # not built: silent
        ("ImportError", "undefined symbol: _ZN3c10", "True"),  # built against another torch
    ],
)
def test_missing_or_broken_kernel_falls_back(error, message, warned):
    code = _IMPORT_WITH.format(error=error, message=message)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.split() == ["False", warned]
