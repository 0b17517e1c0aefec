"""The optional compiled CPU kernel (the separate distribution ``metanorm-native``).

metanorm never needs it for correctness. It computes exactly the maths of PyTorch operations
the layer otherwise runs, in fewer passes over memory:

- ``low_rank_residual``: two matrix products, ``out = F - A (Bᵀ F)`` and ``P = Bᵀ F``, in one
  cache-friendly pass (split over torch's intra-op threads);
- ``running_update``: the running-β update of
  :func:`metanorm.nn.functional.update_running_beta` for one process, in one pass.

Build it after torch with ``pip install --no-build-isolation ./native`` (``make native``).

Nothing is loaded when this module is imported: the extension is looked for the first time
:func:`available`, :func:`applies`, :func:`updates`, :data:`MAX_COLUMNS` or an op is used. Not
installed: these say so silently. Installed but broken (built against another torch, say): one
:class:`RuntimeWarning` then, and metanorm carries on without it.

The ops ``torch.ops.metanorm.low_rank_residual`` and ``torch.ops.metanorm.running_update`` are
registered with :mod:`torch.library` (with fake implementations, so ``torch.compile`` can trace
them) whether or not the kernel is installed; without the kernel, calling one raises
:class:`RuntimeError`. The ``*_fast`` functions call the kernel directly, without the
dispatcher's tens of microseconds a call.
"""

import warnings
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MAX_COLUMNS",
    "applies",
    "available",
    "enabled",
    "low_rank_residual",
    "low_rank_residual_fast",
    "running_update",
    "running_update_fast",
    "set_enabled",
    "updates",
]

MAX_COLUMNS: int  # 16 with the kernel, 0 without; set on first use (see __getattr__)

_FLOATING = (torch.float32, torch.float64)
_loaded = False  # whether the kernel has been looked for
_kernel: ModuleType | None = None  # metanorm_native._C once found and loadable
_max_columns = 0
_enabled = True


def _load() -> ModuleType | None:
    """Looks for the kernel once; a broken build warns (once) and counts as missing."""
    global _loaded, _kernel, _max_columns
    if not _loaded:
        _loaded = True
        try:
            from metanorm_native import _C
        except ModuleNotFoundError as exc:
            if exc.name not in ("metanorm_native", "metanorm_native._C"):
                _warn_broken(exc)
        except (ImportError, OSError) as exc:  # e.g. undefined symbols: another torch
            _warn_broken(exc)
        else:
            _kernel = _C
            _max_columns = int(_C.MAX_COLUMNS)
        globals()["MAX_COLUMNS"] = _max_columns
    return _kernel


def _warn_broken(exc: BaseException) -> None:
    warnings.warn(
        f"metanorm_native is installed but cannot be loaded ({type(exc).__name__}: {exc}); "
        "metanorm uses plain PyTorch instead (same results). Rebuild it against the installed "
        "torch: pip install --no-build-isolation ./native",
        RuntimeWarning,
        stacklevel=3,
    )


def __getattr__(name: str) -> Any:
    if name == "MAX_COLUMNS":
        _load()
        return _max_columns
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available() -> bool:
    """Whether the compiled kernel is installed and loads (whatever :func:`set_enabled` says)."""
    # an import cannot be traced: under torch.compile only a kernel already looked for counts
    # (the first eager call of the layer looks for it)
    if not _loaded and not torch.compiler.is_compiling():
        _load()
    return _kernel is not None


def enabled() -> bool:
    """Whether :func:`applies` may say yes (on by default; see :func:`set_enabled`)."""
    return _enabled


def set_enabled(flag: bool) -> bool:
    """Turns the kernel's use on or off (for comparisons); returns the previous setting.

    It only changes what :func:`applies` answers; the op itself stays callable.
    """
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


def applies(features: Tensor, num_columns: int) -> bool:
    """Whether :func:`low_rank_residual` can take ``features`` with ``num_columns`` columns.

    True when the kernel is available and enabled, ``features`` is a CPU float32/float64
    tensor and ``1 <= num_columns <= MAX_COLUMNS``. Plain attribute checks (no host sync);
    traceable by ``torch.compile(fullgraph=True)``, which guards on :func:`set_enabled`.
    """
    if not _enabled or not available():
        return False
    return (
        features.device.type == "cpu"
        and features.dtype in _FLOATING
        and 1 <= num_columns <= _max_columns
    )


def low_rank_residual_fast(features: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`low_rank_residual`, calling the kernel directly outside ``torch.compile``.

    The registered op's dispatch costs tens of microseconds a call in eager mode; a compiled
    graph traces the registered op (its fake implementation gives the shapes).
    """
    if _kernel is None or torch.compiler.is_compiling():
        return low_rank_residual(features, a, b)
    out, estimate = _kernel.low_rank_residual(features.contiguous(), a.contiguous(), b.contiguous())
    return out, estimate


@torch.library.custom_op("metanorm::low_rank_residual", mutates_args=(), device_types="cpu")
def low_rank_residual(features: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Returns ``(features - a @ (b.T @ features), b.T @ features)`` from the compiled kernel.

    Args:
        features: ``F``, (m, D), CPU float32/float64.
        a: ``A``, (m, K), same dtype, ``1 <= K <= MAX_COLUMNS`` (16).
        b: ``B``, (m, K), same dtype.

    Returns:
        ``(out, P)``: ``out`` (m, D) and ``P = Bᵀ F`` (K, D), new contiguous tensors of the
        inputs' dtype. Non-contiguous inputs are copied first.

    Raises:
        RuntimeError: without the kernel, or for inputs it does not take (K > 16, other
            dtypes, mismatched shapes).

    Not differentiable by itself (no autograd formula is registered): call it where grad mode
    is off, e.g. inside a :class:`torch.autograd.Function`. For fixed ``a`` and ``b`` the map
    is linear in ``features`` and its adjoint is the same map with ``a`` and ``b`` swapped.
    """
    kernel = _load()
    if kernel is None:
        raise RuntimeError(
            "metanorm::low_rank_residual needs the compiled kernel (metanorm_native), which is "
            "not available: pip install --no-build-isolation ./native"
        )
    return kernel.low_rank_residual(features.contiguous(), a.contiguous(), b.contiguous())


@low_rank_residual.register_fake
def _(features: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    torch._check(features.dim() == 2 and a.dim() == 2 and b.dim() == 2, lambda: "2-D expected")
    torch._check(
        a.shape[0] == features.shape[0] and b.shape == a.shape,
        lambda: "a and b must be (m, K) with m = features.shape[0]",
    )
    torch._check(
        a.dtype == features.dtype and b.dtype == features.dtype, lambda: "one dtype expected"
    )
    out = features.new_empty((features.shape[0], features.shape[1]))
    estimate = features.new_empty((a.shape[1], features.shape[1]))
    return out, estimate


def updates(running_beta: Tensor, beta: Tensor, *counters: Tensor | None) -> bool:
    """Whether :func:`running_update` can take these tensors (plain attribute checks).

    True outside ``torch.compile`` when the kernel is available and enabled, ``running_beta``
    and ``beta`` are CPU float32/float64 tensors of one shape and dtype (``running_beta``
    contiguous) and every counter is a CPU int64 0-d tensor.
    """
    if not _enabled or torch.compiler.is_compiling() or not available():
        return False
    if not (
        running_beta.device.type == "cpu"
        and running_beta.dtype in _FLOATING
        and beta.dtype == running_beta.dtype
        and beta.device.type == "cpu"
        and beta.shape == running_beta.shape
        and running_beta.is_contiguous()
    ):
        return False
    return all(
        c is not None and c.device.type == "cpu" and c.dtype == torch.long and c.dim() == 0
        for c in counters
    )


def running_update_fast(
    running_beta: Tensor,
    beta: Tensor,
    count: int,
    momentum: float | None,
    num_batches_tracked: Tensor,
    num_samples_tracked: Tensor,
    num_batches_skipped: Tensor,
) -> Tensor:
    """:func:`running_update`, calling the kernel directly (eager mode; see :func:`updates`)."""
    if _kernel is None:
        raise RuntimeError("metanorm::running_update needs the compiled kernel (metanorm_native)")
    cumulative = momentum is None
    return _kernel.running_update(
        running_beta,
        beta,
        count,
        0.0 if momentum is None else momentum,
        cumulative,
        num_batches_tracked,
        num_samples_tracked,
        num_batches_skipped,
    )


@torch.library.custom_op(
    "metanorm::running_update",
    mutates_args=(
        "running_beta",
        "num_batches_tracked",
        "num_samples_tracked",
        "num_batches_skipped",
    ),
    device_types="cpu",
)
def running_update(
    running_beta: Tensor,
    beta: Tensor,
    count: int,
    momentum: float | None,
    num_batches_tracked: Tensor,
    num_samples_tracked: Tensor,
    num_batches_skipped: Tensor,
) -> Tensor:
    """:func:`metanorm.nn.functional.update_running_beta` for one process, in one pass.

    The same update as the PyTorch function with an int batch size ``count`` and all three
    counters (the factor to the float rounding of its operations): ``running_beta`` and the
    counters are updated in place, and the returned bool 0-d tensor says whether ``beta`` was
    finite (its sum, in its dtype).

    Args:
        running_beta: ``(K, D)`` contiguous CPU float32/float64.
        beta: the batch estimate, same shape and dtype.
        count: the batch size m, ≥ 1.
        momentum: μ, or ``None`` for the cumulative average.
        num_batches_tracked: CPU int64 0-d, the batches folded in (+1 when used).
        num_samples_tracked: CPU int64 0-d, the samples behind them (+m when used).
        num_batches_skipped: CPU int64 0-d, the batches not used (+1 when not finite).

    Raises:
        RuntimeError: without the kernel, or for inputs it does not take.
    """
    kernel = _load()
    if kernel is None:
        raise RuntimeError(
            "metanorm::running_update needs the compiled kernel (metanorm_native), which is "
            "not available: pip install --no-build-isolation ./native"
        )
    return running_update_fast(
        running_beta,
        beta,
        count,
        momentum,
        num_batches_tracked,
        num_samples_tracked,
        num_batches_skipped,
    )


@running_update.register_fake
def _(
    running_beta: Tensor,
    beta: Tensor,
    count: int,
    momentum: float | None,
    num_batches_tracked: Tensor,
    num_samples_tracked: Tensor,
    num_batches_skipped: Tensor,
) -> Tensor:
    torch._check(beta.shape == running_beta.shape, lambda: "running_beta and beta: one shape")
    return running_beta.new_empty((), dtype=torch.bool)
