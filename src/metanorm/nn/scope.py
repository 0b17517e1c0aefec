"""Metadata in scope: MDN layers inside a model whose ``forward(x)`` cannot pass metadata.

:class:`MetadataModel` wraps any model (from MONAI, timm, your own code) so that it is called as
``model(x, metadata=rows)``: for the duration of the call the rows are *in scope*, and every
:class:`~metanorm.nn.MetadataNorm` inside that is called with one argument, ``mdn(h)``, takes
them. :func:`metanorm.nn.convert_metadata_norm` puts MDN layers into an existing model and returns
it wrapped so. The method: Lu et al., "Metadata Normalization", CVPR 2021 (arXiv 2104.09052).

The scope is a :class:`contextvars.ContextVar`, not a module attribute: nested calls, several
threads, and the replicas of :class:`torch.nn.DataParallel` (each replica's ``forward`` runs in
its own thread and sets its own scope) each see their own rows. While :func:`torch.compile`
traces a :class:`MetadataModel`, the rows travel on a trace-time stack instead (dynamo cannot
trace ``ContextVar``), so the whole model compiles as one graph, ``fullgraph=True`` included.

Gradient checkpointing recomputes a forward during the backward pass, outside the call that put
the rows in scope: checkpoint through :func:`~metanorm.nn.scope.checkpoint`, which carries them
into the recomputation.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from metanorm._validation import describe

__all__ = ["MetadataModel", "checkpoint", "current_metadata", "metadata_scope"]

#: One scope entry: the rows, and the MetadataModel that set them (None for metadata_scope).
_Entry = tuple[Tensor, "nn.Module | None"]

# innermost last; immutable tuples, so a context copied into another thread cannot be changed
_SCOPE: contextvars.ContextVar[tuple[_Entry, ...]] = contextvars.ContextVar(
    "metanorm_metadata_scope", default=()
)
# the same entries while torch.compile traces a MetadataModel (dynamo cannot trace ContextVar;
# it traces this list's appends and pops symbolically, so the list is empty outside tracing)
_TRACE_STACK: list[_Entry] = []


def _scope_entries() -> tuple[_Entry, ...]:
    return _SCOPE.get()


# _scope_entries behind torch.compiler.disable: a graph break when reached under torch.compile
# (a compiled region inside an eager scope). Wrapped when a scope is first opened eagerly, not at
# import, since torch.compiler.disable imports torch._dynamo (seconds).
_eager_entries: Callable[[], tuple[_Entry, ...]] | None = None


def _open_eager_scope(entry: _Entry) -> contextvars.Token[tuple[_Entry, ...]]:
    global _eager_entries
    if _eager_entries is None:
        _eager_entries = torch.compiler.disable(_scope_entries)
    return _SCOPE.set((*_SCOPE.get(), entry))


def _entries() -> tuple[_Entry, ...] | list[_Entry]:
    if torch.compiler.is_compiling():
        if _TRACE_STACK:
            return _TRACE_STACK
        if _eager_entries is None:  # no scope was ever opened eagerly
            return ()
        return _eager_entries()
    return _SCOPE.get()


def current_metadata() -> Tensor | None:
    """The design rows in scope (of the innermost :class:`MetadataModel` call), or ``None``.

    For custom layers that, like :class:`~metanorm.nn.MetadataNorm`, take the rows in scope.

    Examples::

        >>> import torch
        >>> current_metadata() is None
        True
        >>> with metadata_scope(torch.ones(4, 2)):
        ...     current_metadata().shape
        torch.Size([4, 2])
    """
    entries = _entries()
    return entries[-1][0] if entries else None


def _entry_model(entries: tuple[_Entry, ...] | list[_Entry], key: str) -> nn.Module | None:
    """The innermost MetadataModel in scope that holds an inserted layer named ``key``."""
    for _, model in reversed(entries):
        inserted = getattr(model, "inserted", None)
        if isinstance(inserted, nn.ModuleDict) and key in inserted:
            return inserted[key]
    return None


def _missing_message(what: str) -> str:
    msg = (
        f"{what} was called without metadata and none is in scope. Call the model through "
        "metanorm.nn.MetadataModel (or the model metanorm.nn.convert_metadata_norm returns) as "
        "model(x, metadata=rows), or pass the rows explicitly as mdn(h, metadata)"
    )
    graph_task = getattr(torch._C, "_current_graph_task_id", lambda: -1)
    if not torch.compiler.is_compiling() and graph_task() != -1:  # inside a backward pass
        msg += (
            ". It ran during the backward pass: gradient checkpointing recomputes the forward "
            "there, outside model(x, metadata=rows); checkpoint with "
            "metanorm.nn.scope.checkpoint(...), which carries the rows into the recomputation"
        )
    return msg


def metadata_for(layer: nn.Module, input: Tensor) -> Tensor:
    """The rows in scope for ``layer``'s batch ``input``; a clear error if there are none.

    Raises:
        TypeError: no rows in scope.
        ValueError: the rows in scope do not have one row per sample of ``input``.
    """
    rows = current_metadata()
    if rows is None:
        raise TypeError(_missing_message(f"{type(layer).__name__}.forward"))
    if rows.dim() < 1 or input.dim() < 1 or rows.shape[0] != input.shape[0]:
        raise ValueError(
            f"expected one design row per sample: this {type(layer).__name__}'s input is "
            f"{describe(input)}, but the metadata in scope (model(x, metadata=rows)) are "
            f"{describe(rows)}"
        )
    return rows


@contextmanager
def metadata_scope(metadata: Tensor) -> Iterator[Tensor]:
    """Puts ``metadata`` in scope for the MDN layers called inside the ``with`` block.

    :class:`MetadataModel` does this for the duration of its call; use this directly in your own
    ``forward`` or training code. Scopes nest (the innermost wins) and are private to the
    thread (and to the asyncio task) that opens them.

    Examples::

        >>> import torch
        >>> from metanorm.nn import MetadataNorm
        >>> design = torch.cat([torch.randn(30, 1), torch.ones(30, 1)], dim=1)
        >>> mdn = MetadataNorm(5, design, keep=())
        >>> with metadata_scope(design[:8]):
        ...     mdn(torch.randn(8, 5)).shape
        torch.Size([8, 5])
    """
    _check_rows(metadata)
    token = _open_eager_scope((metadata, None))
    try:
        yield metadata
    finally:
        _SCOPE.reset(token)


def _check_rows(metadata: Any) -> None:
    if not isinstance(metadata, Tensor):
        raise TypeError(
            "expected metadata (the batch's design rows) to be a tensor of shape (m, K), got "
            f"{describe(metadata)}"
        )


class MetadataModel(nn.Module):
    r"""Wraps a model so that it is called as ``model(*inputs, metadata=rows)``.

    For the duration of the call, ``rows`` are the metadata in scope: every
    :class:`~metanorm.nn.MetadataNorm` inside that is called with one argument takes them. The
    wrapped model's ``forward`` is unchanged and never sees the rows. Use
    :func:`metanorm.nn.convert_metadata_norm` to put MDN layers into an existing model; use this
    class directly for a model that already calls ``mdn(h)`` with one argument.

    No attribute changes per batch (the scope is a :class:`contextvars.ContextVar`): nested
    calls, threads and :class:`torch.nn.DataParallel` replicas (``DataParallel(MetadataModel(m))``
    scatters ``metadata`` with the inputs) each see their own rows.
    :class:`~torch.nn.parallel.DistributedDataParallel`, :func:`torch.compile` (one graph,
    ``fullgraph=True`` works), ``state_dict``, :func:`copy.deepcopy` and pickling work as for
    any module. For gradient checkpointing inside the model use
    :func:`~metanorm.nn.scope.checkpoint`.

    The wrapped model is the submodule ``module`` (so ``state_dict`` keys start with
    ``module.``); layers inserted by :func:`~metanorm.nn.convert_metadata_norm` are in
    ``inserted``.

    Args:
        model: the model to wrap.

    Shape:
        - Inputs: whatever ``model`` takes, batch size m.
        - Metadata: :math:`(m, K)`, the batch's design rows.
        - Output: whatever ``model`` returns.

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from metanorm.nn import MetadataNorm
        >>> design = torch.cat([torch.randn(100, 1), torch.ones(100, 1)], dim=1)
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 1)
        ...         self.mdn = MetadataNorm(8, design, keep=())
        ...     def forward(self, x):                  # no metadata argument
        ...         return self.fc2(torch.relu(self.mdn(self.fc1(x))))
        >>> model = MetadataModel(Net())
        >>> model(torch.randn(16, 6), metadata=design[:16]).shape
        torch.Size([16, 1])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected model to be a torch.nn.Module, got {describe(model)}")
        self.module = model
        self.inserted = nn.ModuleDict()

    def forward(self, *inputs: Any, metadata: Tensor, **kwargs: Any) -> Any:
        """Calls ``model(*inputs, **kwargs)`` with ``metadata`` in scope."""
        _check_rows(metadata)
        entry = (metadata, self)
        if torch.compiler.is_compiling():
            _TRACE_STACK.append(entry)
            try:
                return self.module(*inputs, **kwargs)
            finally:
                _TRACE_STACK.pop()
        token = _open_eager_scope(entry)
        try:
            return self.module(*inputs, **kwargs)
        finally:
            _SCOPE.reset(token)


class _ApplyInserted:
    """Forward hook: passes a module's output through the inserted MDN layer ``key``.

    The layer is looked up in the :class:`MetadataModel` in scope (not held here), so replicas,
    deep copies and pickles of the model each use their own layer.
    """

    def __init__(self, key: str, name: str) -> None:
        self.key = key
        self.name = name

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        entries = _entries()
        layer = _entry_model(entries, self.key)
        if layer is None:
            raise TypeError(
                _missing_message(f"the MDN layer inserted after {self.name!r}")
                if not entries
                else f"the MDN layer inserted after {self.name!r} is not in the MetadataModel "
                "in scope: call the model that convert_metadata_norm returned, as "
                "model(x, metadata=rows)"
            )
        if not isinstance(output, Tensor):
            raise TypeError(
                f"an MDN layer can follow only a module that returns a tensor; {self.name!r} "
                f"returned {describe(output)}"
            )
        return layer(output)


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """:func:`torch.utils.checkpoint.checkpoint` that keeps the metadata in scope on recompute.

    Checkpointing recomputes ``function`` during the backward pass, outside the
    ``model(x, metadata=rows)`` call (and, on a GPU, in another thread); this captures the rows
    in scope now and puts them in scope again for the recomputation. Arguments are those of
    :func:`torch.utils.checkpoint.checkpoint`; ``use_reentrant`` defaults to ``False``.

    Examples::

        >>> import torch
        >>> from metanorm.nn import MetadataNorm
        >>> design = torch.cat([torch.randn(30, 1), torch.ones(30, 1)], dim=1)
        >>> block = torch.nn.Sequential(torch.nn.Linear(4, 4), MetadataNorm(4, design, keep=()))
        >>> x = torch.randn(8, 4, requires_grad=True)
        >>> with metadata_scope(design[:8]):
        ...     out = checkpoint(block, x)
        >>> out.sum().backward()                   # the recomputation sees the rows
        >>> x.grad.shape
        torch.Size([8, 4])
    """
    kwargs.setdefault("use_reentrant", False)
    if torch.compiler.is_compiling():  # the compiled graph recomputes; the rows are its inputs
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)
    captured = _SCOPE.get()

    def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
        token = _SCOPE.set(captured)
        try:
            return function(*inner_args, **inner_kwargs)
        finally:
            _SCOPE.reset(token)

    return torch.utils.checkpoint.checkpoint(run, *args, **kwargs)
