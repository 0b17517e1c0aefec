"""PyTorch Lightning: a ``LayerSync`` plugin that syncs the MDN layers (and BatchNorm) under DDP.

Lightning takes one ``LayerSync`` plugin per ``Trainer``; its built-in one
(``sync_batchnorm=True``) converts BatchNorm only. :class:`MetadataNormSync` converts both:
every MDN layer to its synchronised class (:class:`~metanorm.nn.MetadataNorm` to
:class:`~metanorm.nn.SyncMetadataNorm`, β estimated from the union of the processes' batches;
the recursive, penalty and scale layers likewise) and every BatchNorm to
:class:`torch.nn.SyncBatchNorm`, when ``fit`` sets up a DDP strategy; Lightning reverts them
when ``fit`` ends, so the module holds plain layers again afterwards::

    import pytorch_lightning as pl   # or: import lightning.pytorch as pl
    from metanorm.integrations.lightning import MetadataNormSync

    trainer = pl.Trainer(strategy="ddp", devices=2, plugins=[MetadataNormSync()])
    trainer.fit(module)

:class:`RefitRunningBeta` is a callback that refits the MDN layers' evaluation β
(:func:`metanorm.nn.utils.refit_running_beta`) on the training data before validation::

    trainer = pl.Trainer(callbacks=[RefitRunningBeta(every_n_epochs=1)])

:class:`LogProbe` is a callback that runs the bias probe (:func:`metanorm.probe`) at the end of
each validation epoch and logs, per module, the within-class dcor² and the probe's R² with the
metadata (``probe/<module>/dcor2``, ``probe/<module>/r2``)::

    trainer = pl.Trainer(callbacks=[LogProbe(metadata=1, modules=["net.3", "net.4"])])

Works with the ``pytorch_lightning`` package and with the ``lightning`` package's
``lightning.pytorch`` namespace, whichever is installed (with both, the plugin is an instance of
both ``LayerSync`` classes, so either ``Trainer`` accepts it). Install with
``pip install metanorm[lightning]``. See ``docs/distributed.md``.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from metanorm._probe import ProbeResult, probe
from metanorm.nn import MetadataModel, SyncMetadataNorm, revert_sync_metadata_norm
from metanorm.nn.utils import refit_running_beta

__all__ = ["LogProbe", "MetadataNormSync", "RefitRunningBeta"]

_NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def _plugin_modules() -> list[Any]:
    """The ``plugins`` modules of the installed Lightning namespaces."""
    found = []
    for name in _NAMESPACES:
        try:
            found.append(importlib.import_module(f"{name}.plugins"))
        except ImportError:
            continue
    if not found:
        raise ImportError(
            "metanorm.integrations.lightning needs PyTorch Lightning: "
            "pip install 'metanorm[lightning]' (or the 'lightning' package)"
        )
    return found


_PLUGINS = _plugin_modules()

if TYPE_CHECKING:
    from pytorch_lightning.plugins import LayerSync as _LayerSync
elif len(_PLUGINS) == 1:
    _LayerSync = _PLUGINS[0].LayerSync
else:

    class _LayerSync(*(m.LayerSync for m in _PLUGINS)):
        """``LayerSync`` of every installed Lightning namespace."""


_CALLBACKS = [importlib.import_module(m.__name__.rpartition(".")[0]) for m in _PLUGINS]

if TYPE_CHECKING:
    from pytorch_lightning import Callback as _Callback
elif len(_CALLBACKS) == 1:
    _Callback = _CALLBACKS[0].Callback
else:

    class _Callback(*(m.Callback for m in _CALLBACKS)):
        """``Callback`` of every installed Lightning namespace."""


class MetadataNormSync(_LayerSync):
    """A Lightning ``LayerSync`` plugin for MetadataNorm and BatchNorm layers.

    ``apply`` (called by Lightning's DDP strategies when ``fit`` starts, before the model is
    wrapped) converts every MDN layer to its synchronised class with
    :meth:`~metanorm.nn.SyncMetadataNorm.convert_sync_metadata_norm` and, with
    ``batch_norm=True``, every BatchNorm with
    :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`; ``revert`` (called when ``fit`` ends)
    turns them back into plain layers. The layers keep their parameters and
    buffers (running β, Σ⁻¹, running mean and variance) through both.

    In one process (or without torch.distributed) the synced layers compute what the plain ones
    do. Every process must run the synced layers in each training step, as with
    ``SyncBatchNorm``.

    .. note::
        :class:`torch.nn.SyncBatchNorm` runs on GPUs (and XPU/HPU) only: on the CPU, DDP refuses
        it ("SyncBatchNorm layers only work with GPU modules"). So by default BatchNorm layers
        are converted except under a CPU-only backend (gloo or MPI), where they are left as
        they are, each process normalising by its own batch, with a warning. MetadataNorm is
        synced on every backend.

    Args:
        batch_norm: also convert BatchNorm layers (Lightning allows one ``LayerSync`` plugin, so
            this one replaces ``sync_batchnorm=True``): ``True``, ``False``, or ``None`` to
            convert them unless the process group's backend is gloo or MPI (see the note).
            Default: ``None``.
        process_group: the processes to sync over. Default: ``None``, the whole world.

    Examples::

        >>> import torch
        >>> from metanorm.nn import MetadataNorm
        >>> design = torch.cat([torch.randn(40, 1), torch.ones(40, 1)], dim=1)
        >>> model = torch.nn.Sequential(
        ...     torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), MetadataNorm(8, design, keep=())
        ... )
        >>> plugin = MetadataNormSync()
        >>> [type(m).__name__ for m in plugin.apply(model)]
        ['Linear', 'SyncBatchNorm', 'SyncMetadataNorm']
        >>> [type(m).__name__ for m in plugin.revert(model)]
        ['Linear', 'BatchNorm1d', 'MetadataNorm']
    """

    def __init__(self, *, batch_norm: bool | None = None, process_group: Any = None) -> None:
        self.batch_norm = batch_norm
        self.process_group = process_group

    def apply(self, model: nn.Module) -> nn.Module:
        """Converts the MetadataNorm (and BatchNorm) layers of ``model`` to synced ones.

        Returns:
            ``model`` with synced layers (a new object only if ``model`` itself is a layer).
        """
        model = SyncMetadataNorm.convert_sync_metadata_norm(model, self.process_group)
        if self._sync_batch_norm(model):
            classes = {
                name: type(m)
                for name, m in model.named_modules()
                if isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
            }
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model, self.process_group)
            for name, m in model.named_modules():
                if name in classes and isinstance(m, nn.SyncBatchNorm):
                    m.__dict__["_metanorm_batchnorm_class"] = classes[name]
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        """Turns the synced layers of ``model`` back into plain ones.

        ``SyncMetadataNorm`` becomes :class:`~metanorm.nn.MetadataNorm`; ``SyncBatchNorm``
        becomes ``BatchNorm1d``/``2d``/``3d`` according to the ``_BatchNorm`` class it was
        converted from when known (recorded by :meth:`apply`), else Lightning's own dimension-free
        BatchNorm (what Lightning's ``TorchSyncBatchNorm`` plugin restores).

        Returns:
            ``model`` with plain layers (a new object only if ``model`` itself is a layer).
        """
        model = revert_sync_metadata_norm(model)
        if self.batch_norm is not False:
            model = _revert_sync_batchnorm(model)
        return model

    def _sync_batch_norm(self, model: nn.Module) -> bool:
        if self.batch_norm is not None:
            return self.batch_norm
        if not (dist.is_available() and dist.is_initialized()):
            return True  # a SyncBatchNorm outside torch.distributed is a BatchNorm
        group = dist.group.WORLD if self.process_group is None else self.process_group
        if str(dist.get_backend(group)) not in ("gloo", "mpi"):
            return True
        if any(isinstance(m, _BatchNorm) for m in model.modules()):
            warnings.warn(
                "MetadataNormSync: BatchNorm layers left unsynced under the CPU-only "
                f"{dist.get_backend(group)!r} backend (torch's SyncBatchNorm needs GPUs); "
                "each process normalises them by its own batch",
                UserWarning,
                stacklevel=2,
            )
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_norm={self.batch_norm})"


def _revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``SyncBatchNorm`` → the BatchNorm class it was converted from, sharing its tensors."""
    if isinstance(module, nn.SyncBatchNorm):
        cls = module.__dict__.get("_metanorm_batchnorm_class")
        if cls is None:  # not converted by MetadataNormSync.apply: Lightning's own revert
            return _PLUGINS[0].TorchSyncBatchNorm().revert(module)
        plain = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            plain.weight = module.weight
            plain.bias = module.bias
        plain.running_mean = module.running_mean
        plain.running_var = module.running_var
        plain.num_batches_tracked = module.num_batches_tracked
        plain.train(module.training)
        for name, child in module.named_children():
            plain.add_module(name, child)
        return plain
    for name, child in module.named_children():
        reverted = _revert_sync_batchnorm(child)
        if reverted is not child:
            module.add_module(name, reverted)
    return module


class RefitRunningBeta(_Callback):
    """A Lightning callback that refits the MDN layers' evaluation β before validation.

    A running β averaged over an epoch's batches lags behind the final weights;
    :func:`metanorm.nn.utils.refit_running_beta` replaces it by the least-squares β of the
    current weights over the training data. Lightning runs validation *inside* the training
    epoch, before ``on_train_epoch_end``, so a refit in that hook comes too late for the
    validation of its epoch. This callback refits in ``on_validation_epoch_start`` while
    fitting (not in the sanity check, nor in ``trainer.validate``), and in
    ``on_train_epoch_end`` when no validation followed the epoch's last step; once per step.
    Under DDP every process refits on its shard of the training loader and the sums are
    all-reduced, so the processes end with the same β (the refit runs on every process: all
    must reach the hook, as they do).

    Args:
        every_n_epochs: refit in every n-th epoch (epochs n-1, 2n-1, ... counting from 0).
            Default: 1.
        loader: the data to refit on (batches of ``(input, ..., design_rows)`` unless
            ``call`` is given). Default: the trainer's training loader.
        call: ``call(pl_module, batch)`` runs the module on one batch (see
            :func:`~metanorm.nn.utils.refit_running_beta`). Default: ``pl_module(input,
            design_rows)`` on the module's device.
        layer_by_layer, estimators, check_design: as for
            :func:`~metanorm.nn.utils.refit_running_beta`.

    Examples::

        >>> callback = RefitRunningBeta(every_n_epochs=2)
        >>> callback
        RefitRunningBeta(every_n_epochs=2)
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        *,
        loader: Iterable[Any] | None = None,
        call: Callable[[nn.Module, Any], Any] | None = None,
        layer_by_layer: bool = True,
        estimators: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
        check_design: bool = True,
    ) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int):
            raise TypeError(f"expected every_n_epochs to be a positive int, got {every_n_epochs!r}")
        if every_n_epochs < 1:
            raise ValueError(f"expected every_n_epochs to be a positive int, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.loader = loader
        self.call = call
        self.layer_by_layer = layer_by_layer
        self.estimators = estimators
        self.check_design = check_design
        self._last: tuple[int, int] | None = None

    def _due(self, trainer: Any) -> bool:
        return (int(trainer.current_epoch) + 1) % self.every_n_epochs == 0

    def _refit(self, trainer: Any, pl_module: nn.Module) -> None:
        step = (int(trainer.current_epoch), int(trainer.global_step))
        if self._last == step or not self._due(trainer):
            return
        loader = self.loader if self.loader is not None else trainer.train_dataloader
        if loader is None or isinstance(loader, dict | list | tuple):
            raise ValueError(
                "RefitRunningBeta: expected one training loader to refit on, got "
                f"{type(loader).__name__}; pass RefitRunningBeta(loader=...)"
            )
        self._last = step
        refit_running_beta(
            pl_module,
            loader,
            call=self.call,
            device=None if self.call is not None else getattr(pl_module, "device", None),
            layer_by_layer=self.layer_by_layer,
            estimators=self.estimators,
            check_design=self.check_design,
        )

    def on_validation_epoch_start(self, trainer: Any, pl_module: nn.Module) -> None:
        """Refits before a validation while fitting (not in the sanity check)."""
        if trainer.sanity_checking or str(getattr(trainer.state.fn, "value", "")) != "fit":
            return
        self._refit(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        """Refits at the end of an epoch that no validation followed."""
        self._refit(trainer, pl_module)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every_n_epochs={self.every_n_epochs})"


class LogProbe(_Callback):
    """A Lightning callback that logs the bias probe at the end of each validation epoch.

    Runs :func:`metanorm.probe` on the module over a loader (default: the trainer's validation
    loader) and logs, for every probed module, the within-class squared distance correlation
    with the metadata and the held-out partial R² of the linear probe, through
    ``pl_module.log`` (so to every logger of the trainer), as ``<prefix>/<module>/dcor2`` and
    ``<prefix>/<module>/r2``. With the module's MDN layers refitted before validation
    (:class:`RefitRunningBeta`), the probe sees the evaluation β of the epoch's weights.

    The probe runs in evaluation mode under ``torch.no_grad()`` (the module's train/eval flags
    are restored, and so is the CPU random generator, so training continues as it would
    without the callback) and reads at most ``max_samples`` samples, the first ones the loader
    yields; outputs wider than ``max_features`` are randomly projected, so memory is bounded by
    ``max_samples × max_features`` numbers per probed module. It costs one evaluation pass over
    those samples plus a ridge fit per module and fold: name the modules of interest
    (``modules=``) rather than every leaf of a large model, or use ``every_n_epochs``.

    Under DDP the probe runs **on rank 0 only**, over the loader as rank 0 sees it (with the
    trainer's validation loader and a ``DistributedSampler``, rank 0's shard of the validation
    set: a subsample, like ``max_samples``), and the values are logged with
    ``rank_zero_only=True``: the other processes neither compute nor log them, so do not
    monitor them in a callback that runs on every rank (such as ``ModelCheckpoint`` under
    DDP). The forward pass calls the unwrapped module in evaluation mode, where the synced MDN
    and BatchNorm layers use their running statistics and communicate nothing, so rank 0 alone
    can run it. Nothing runs in the sanity check.

    Args:
        metadata: what to probe for, as for :func:`metanorm.probe`: a design-row column index,
            a list of them, or a function ``rows -> (m, p) tensor``.
        loader: batches of ``(input, labels, ..., design_rows)`` (or any structure, with
            ``targets`` and ``call``). Default: the trainer's validation loader (the first, if
            several).
        modules: qualified module names in ``pl_module`` to probe. Default: every leaf module.
        targets: ``batch -> (labels, rows)``. Default: ``(batch[1], batch[-1])``.
        call: ``call(pl_module, batch)`` runs the forward pass. Default:
            ``pl_module(input, design_rows)`` on the module's device (``input=`` the first
            element, ``design_rows`` the last), or ``pl_module(input, metadata=design_rows)``
            for a :class:`~metanorm.nn.MetadataModel`.
        every_n_epochs: probe in every n-th epoch (epochs n-1, 2n-1, ... counting from 0).
            Default: 1.
        max_samples: samples to read at most. Default: 1000.
        max_features: outputs wider than this are randomly projected. Default: 256.
        folds: cross-validation folds of the linear probe. Default: 5.
        prefix: the first part of the logged names. Default: ``"probe"``.
        seed: seed of the projections and the folds (the same every epoch, so epochs compare).
            Default: 0.

    Attributes:
        results: ``{epoch: ProbeResult}`` of the epochs probed so far (on rank 0).

    Examples::

        >>> callback = LogProbe(metadata=1, modules=["net.0", "net.1"], max_samples=500)
        >>> callback
        LogProbe(metadata=1, modules=['net.0', 'net.1'], every_n_epochs=1, max_samples=500)
    """

    def __init__(
        self,
        metadata: int | Sequence[int] | Callable[[torch.Tensor], torch.Tensor],
        *,
        loader: Iterable[Any] | None = None,
        modules: Sequence[str] | None = None,
        targets: Callable[[Any], tuple[Any, Any]] | None = None,
        call: Callable[[nn.Module, Any], Any] | None = None,
        every_n_epochs: int = 1,
        max_samples: int = 1000,
        max_features: int = 256,
        folds: int = 5,
        prefix: str = "probe",
        seed: int = 0,
    ) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int):
            raise TypeError(f"expected every_n_epochs to be a positive int, got {every_n_epochs!r}")
        if every_n_epochs < 1:
            raise ValueError(f"expected every_n_epochs to be a positive int, got {every_n_epochs}")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 8:
            raise ValueError(f"expected max_samples to be an int >= 8, got {max_samples!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"expected prefix to be a str, got {type(prefix).__name__}")
        if not (callable(metadata) or isinstance(metadata, int | list | tuple)):
            raise TypeError(
                "expected metadata to be a column index, a list of column indices or a function "
                f"rows -> tensor, got {type(metadata).__name__}"
            )
        if isinstance(modules, str):
            raise TypeError(f"expected modules to be a list of module names, got {modules!r}")
        self.metadata = metadata
        self.loader = loader
        self.modules = None if modules is None else list(modules)
        self.targets = targets
        self.call = call
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.max_features = max_features
        self.folds = folds
        self.prefix = prefix
        self.seed = seed
        self.results: dict[int, ProbeResult] = {}

    def _loader(self, trainer: Any) -> Iterable[Any]:
        loader = self.loader if self.loader is not None else trainer.val_dataloaders
        if isinstance(loader, list | tuple) and loader and not isinstance(loader[0], torch.Tensor):
            loader = loader[0]  # several validation loaders: the first
        if loader is None or isinstance(loader, dict):
            raise ValueError(
                "LogProbe: expected a loader to probe on, got "
                f"{type(loader).__name__} from the trainer; pass LogProbe(loader=...)"
            )
        return loader

    def _default_call(self, pl_module: nn.Module) -> Callable[[nn.Module, Any], Any]:
        device = getattr(pl_module, "device", None)

        def call(model: nn.Module, batch: Any) -> None:
            if not isinstance(batch, list | tuple) or len(batch) < 3:
                raise TypeError(
                    "LogProbe's default call: expected each batch to be a tuple (input, labels, "
                    f"..., design_rows), got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else "")
                    + "; pass LogProbe(targets=..., call=...)"
                )
            x, rows = batch[0], batch[-1]
            if device is not None:
                x, rows = x.to(device), rows.to(device)
            if isinstance(model, MetadataModel):
                model(x, metadata=rows)
            else:
                model(x, rows)

        return call

    def on_validation_epoch_end(self, trainer: Any, pl_module: nn.Module) -> None:
        """Probes and logs (rank 0; every ``every_n_epochs``-th epoch; not in the sanity check)."""
        if trainer.sanity_checking:
            return
        epoch = int(trainer.current_epoch)
        if (epoch + 1) % self.every_n_epochs != 0 or not trainer.is_global_zero:
            return
        # the loader's iterator draws its base seed from the global generator: restore it, so
        # that training goes on with the random numbers it would have had without the probe
        with torch.random.fork_rng(devices=[]):
            result = probe(
                pl_module,
                self._loader(trainer),
                self.metadata,
                modules=self.modules,
                targets=self.targets,
                call=self.call if self.call is not None else self._default_call(pl_module),
                max_samples=self.max_samples,
                max_features=self.max_features,
                folds=self.folds,
                seed=self.seed,
                label=type(pl_module).__name__,
            )
        self.results[epoch] = result
        log = getattr(pl_module, "log", None)
        if log is None:  # pragma: no cover - every LightningModule has log
            return
        for record in result:
            name = f"{self.prefix}/{record.module or type(pl_module).__name__}"
            for key, value in (("dcor2", record.dcor2), ("r2", record.probe_r2)):
                if not math.isnan(value):
                    log(f"{name}/{key}", float(value), rank_zero_only=True)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(metadata={self.metadata!r}, modules={self.modules!r}, "
            f"every_n_epochs={self.every_n_epochs}, max_samples={self.max_samples})"
        )
