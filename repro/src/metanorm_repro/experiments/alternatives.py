r"""Training objectives of the alternatives to MDN: BR-Net, DANN and Group DRO (harness side).

A method of :mod:`metanorm_repro.models.methods` whose
:attr:`~metanorm_repro.models.methods.Method.objective` is set trains with one of the objectives
of the table :data:`OBJECTIVES` instead of the plain task loss. The experiment's
``make_model`` attaches it to the model (:func:`attach_objective`, as the submodule
``model.objective``, so that the run's optimizer trains its parameters too) and
:func:`~metanorm_repro.experiments.train_one_epoch` calls it on every training batch::

    loss = model.objective(logits, features, labels, rows)

``rows`` are the batch's design rows; the confounder is read from their columns that are neither
kept nor the intercept (:func:`~metanorm_repro.models.norms.confounder_columns`: ``cf`` of
``[y, cf, 1]``). Evaluation is unchanged (the objective is used in training only).

- :class:`BRNetObjective` (``"brnet"``, ``"brnet-cond"``; Adeli et al., WACV 2021): a bias
  predictor (an MLP on the features) and the squared Pearson correlation
  :func:`pearson_r2` between the confounder and its prediction. In one step the predictor is
  trained on the *detached* features to maximise r² (the paper's loss; ``predictor_loss="mse"``
  for an MSE regression), the encoder, through the features with the predictor's parameters
  frozen, to minimise ``weight · r²``, and encoder and classifier on the task loss. The three
  updates of the paper's alternating scheme are taken as one simultaneous Adam step (their
  gradients reach disjoint parameters). ``-cond``: the label-conditional variant, r² of the
  within-class centred confounder and prediction (cf − E[cf | y] with the batch's class means).
- :class:`DANNObjective` (``"dann"``, ``"dann-cond"``; Ganin & Lempitsky, ICML 2015): a head
  predicting the confounder's quantile bin (bins fixed from the training design) behind a
  gradient reversal layer (:func:`grad_reverse`) whose weight ramps up with the training
  progress p ∈ [0, 1] (:func:`dann_lambda`, Ganin & Lempitsky's ``2 / (1 + exp(−10 p)) − 1``),
  or stays constant (``schedule="constant"``). ``-cond``: one head per class, with bins from the
  quantiles of the confounder within that class.
- :class:`GroupDROObjective` (``"groupdro"``; Sagawa et al., ICLR 2020): groups label × confounder
  bin, exponentiated-gradient group weights ``q ← q · exp(η · loss_g)`` (normalised), loss
  ``Σ_g q_g · loss_g`` over the groups present in the batch.

Settings and measured behaviour: ``docs/alternatives.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metanorm.design import Design
from metanorm_repro.experiments import plots
from metanorm_repro.experiments.bounds import SYNTHETIC_REFERENCE_ACCURACIES
from metanorm_repro.experiments.engine import loss_and_predictions
from metanorm_repro.models.methods import get_method
from metanorm_repro.models.norms import confounder_columns

__all__ = [
    "OBJECTIVES",
    "BRNetObjective",
    "DANNObjective",
    "GroupDROObjective",
    "ObjectiveFactory",
    "attach_objective",
    "dann_lambda",
    "grad_reverse",
    "make_objective",
    "pearson_r2",
    "plot_bacc_vs_dcor2",
    "quantile_edges",
    "register_objective",
]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.weight * grad, None


def grad_reverse(x: Tensor, weight: float = 1.0) -> Tensor:
    """The gradient reversal layer: ``x`` forward, ``-weight ·`` the gradient backward.

    Examples::

        >>> x = torch.ones(3, requires_grad=True)
        >>> (grad_reverse(x, 0.5) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        >>> x.grad
        tensor([-0.5000, -1.0000, -1.5000])
    """
    out: Tensor = _GradReverse.apply(x, float(weight))
    return out


def pearson_r2(a: Tensor, b: Tensor, groups: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """The squared Pearson correlation of two ``(m,)`` tensors (differentiable).

    Args:
        a: the first variable.
        b: the second variable.
        groups: ``(m,)`` integer labels: centre each variable within each group first (the
            pooled within-group correlation; BR-Net's label-conditional loss). Default: ``None``.
        eps: added to the variance product.

    Examples::

        >>> a = torch.tensor([1.0, 2.0, 3.0, 4.0])
        >>> round(float(pearson_r2(a, 2 * a + 1)), 6)
        1.0
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"expected two (m,) tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if groups is None:
        ac, bc = a - a.mean(), b - b.mean()
    else:
        onehot = F.one_hot(groups.long()).to(a.dtype)  # (m, G)
        counts = onehot.sum(0).clamp_min(1.0)
        ac = a - onehot @ ((onehot.T @ a) / counts)
        bc = b - onehot @ ((onehot.T @ b) / counts)
    cov = (ac * bc).sum()
    return cov * cov / ((ac * ac).sum() * (bc * bc).sum() + eps)


def quantile_edges(values: np.ndarray | Tensor, bins: int) -> Tensor:
    """The ``bins - 1`` inner edges of equal-count bins of ``values`` (for ``torch.bucketize``)."""
    if bins < 2:
        raise ValueError(f"expected bins >= 2, got {bins}")
    v = np.asarray(values, dtype=np.float64)
    q = np.quantile(v, np.arange(1, bins) / bins)
    return torch.as_tensor(q, dtype=torch.float32)


def _mlp(width: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out))


class _Objective(nn.Module):
    """Reads the confounder columns and the class count from the training design."""

    def __init__(self, design: Design) -> None:
        super().__init__()
        if not isinstance(design, Design):
            raise TypeError(f"expected a metanorm.design.Design, got {type(design).__name__}")
        self.columns = confounder_columns(design)
        if not self.columns:
            raise ValueError(f"the design {design.columns} has no confounder column")
        matrix = np.asarray(design.matrix, dtype=np.float64)
        self._train_conf = matrix[:, self.columns[0]]
        self._train_labels = matrix[:, design.keep[0]].astype(int) if design.keep else None

    def confounder(self, rows: Tensor) -> Tensor:
        """The first confounder column of the batch's design rows, ``(m,)``."""
        return rows[:, self.columns[0]].float().contiguous()

    def task(self, logits: Tensor, labels: Tensor) -> Tensor:
        return loss_and_predictions(logits, labels)[0]


class BRNetObjective(_Objective):
    """BR-Net's bias predictor and correlation loss; see the module docstring.

    Args:
        design: the training design.
        features: the features' width.
        conditional: the label-conditional variant. Default: ``False``.
        weight: weight of the encoder's r² loss. Default: 1.
        hidden: the predictor's hidden width. Default: 32.
        predictor_loss: ``"corr"`` (maximise r², the paper) or ``"mse"``. Default: ``"corr"``.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        design: Design,
        features: int,
        *,
        conditional: bool = False,
        weight: float = 1.0,
        hidden: int = 32,
        predictor_loss: str = "corr",
    ) -> None:
        super().__init__(design)
        if predictor_loss not in ("corr", "mse"):
            raise ValueError(f"expected predictor_loss 'corr' or 'mse', got {predictor_loss!r}")
        self.conditional, self.weight, self.predictor_loss = conditional, weight, predictor_loss
        self.predictor = _mlp(features, hidden, len(self.columns))
        conf = np.asarray(design.matrix, dtype=np.float64)[:, self.columns]
        self.register_buffer("mean", torch.as_tensor(conf.mean(0), dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(conf.std(0) + 1e-8, dtype=torch.float32))

    def r2(self, target: Tensor, pred: Tensor, labels: Tensor) -> Tensor:
        """Σ over confounder columns of r²(target, prediction) (within class if conditional)."""
        groups = labels if self.conditional else None
        terms = [pearson_r2(target[:, j], pred[:, j], groups) for j in range(target.shape[1])]
        return torch.stack(terms).sum()

    def forward(self, logits: Tensor, features: Tensor, labels: Tensor, rows: Tensor) -> Tensor:
        """The batch's training loss (see the module docstring)."""
        target = (rows[:, self.columns].float() - self.mean) / self.std
        feats = features.flatten(1)
        pred = self.predictor(feats.detach())  # the predictor's step: encoder frozen
        if self.predictor_loss == "mse":
            loss_bp = F.mse_loss(pred, target)
        else:
            loss_bp = -self.r2(target, pred, labels)
        frozen = {k: v.detach() for k, v in self.predictor.named_parameters()}
        adv = torch.func.functional_call(self.predictor, frozen, (feats,))  # predictor frozen
        return self.task(logits, labels) + self.weight * self.r2(target, adv, labels) + loss_bp


def dann_lambda(progress: float, weight: float = 1.0, gamma: float = 10.0) -> float:
    r"""Ganin & Lempitsky's reversal-weight ramp: ``weight · (2 / (1 + exp(−gamma · p)) − 1)``.

    It rises from 0 at the start of training (``p = 0``) to almost ``weight`` at the end
    (``p = 1``: ``0.99991 · weight`` for ``gamma = 10``), so that the adversary's gradient
    reaches the encoder only once the head has learnt something.

    Args:
        progress: the training progress p, in [0, 1].
        weight: the final weight. Default: 1.
        gamma: the ramp's steepness (10 in the paper). Default: 10.

    Examples::

        >>> [round(dann_lambda(p), 4) for p in (0.0, 0.1, 0.5, 1.0)]
        [0.0, 0.4621, 0.9866, 0.9999]
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"expected a training progress in [0, 1], got {progress!r}")
    return weight * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


#: The reversal-weight schedules of :class:`DANNObjective`.
DANN_SCHEDULES: tuple[str, ...] = ("ramp", "constant")


class DANNObjective(_Objective):
    """A confounder-bin head behind a gradient reversal layer; see the module docstring.

    The reversal weight at a training step is ``dann_lambda(p, weight)`` with ``schedule="ramp"``
    (the default; Ganin & Lempitsky), ``p = steps / total_steps`` the training progress: the
    objective counts its own training steps (calls in training mode with gradients enabled, the
    buffer ``steps``), so the loop that trains it need not know; ``total_steps`` (the
    run's epochs × batches per epoch) is set at construction or later (the experiment's
    ``make_model`` sets it from the run's configuration). With ``schedule="constant"`` it is
    ``weight`` throughout.

    Args:
        design: the training design.
        features: the features' width.
        conditional: one head (and bin edges) per class. Default: ``False``.
        bins: quantile bins of the confounder. Default: 4.
        weight: the reversal weight λ (the ramp's final value). Default: 1.
        hidden: the head's hidden width. Default: 32.
        schedule: ``"ramp"`` or ``"constant"``. Default: ``"ramp"``.
        total_steps: the training steps the ramp spans (needed by ``"ramp"`` before the first
            training step). Default: ``None``.
    """

    edges: Tensor
    steps: Tensor

    def __init__(
        self,
        design: Design,
        features: int,
        *,
        conditional: bool = False,
        bins: int = 4,
        weight: float = 1.0,
        hidden: int = 32,
        schedule: str = "ramp",
        total_steps: int | None = None,
    ) -> None:
        super().__init__(design)
        if schedule not in DANN_SCHEDULES:
            raise ValueError(f"expected schedule in {DANN_SCHEDULES}, got {schedule!r}")
        self.conditional, self.weight, self.bins = conditional, weight, bins
        self.schedule = schedule
        self.total_steps = total_steps
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        if conditional:
            if self._train_labels is None:
                raise ValueError("dann-cond needs the label as a kept design column")
            classes = int(self._train_labels.max()) + 1
            edges = [
                quantile_edges(self._train_conf[self._train_labels == c], bins)
                for c in range(classes)
            ]
            self.register_buffer("edges", torch.stack(edges))  # (C, bins - 1)
            self.heads = nn.ModuleList(_mlp(features, hidden, bins) for _ in range(classes))
        else:
            self.register_buffer("edges", quantile_edges(self._train_conf, bins)[None])
            self.heads = nn.ModuleList([_mlp(features, hidden, bins)])

    @property
    def total_steps(self) -> int | None:
        """The training steps the ramp spans (``None``: not set)."""
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"expected total_steps to be a positive int or None, got {value!r}")
        self._total_steps = value

    def progress(self) -> float:
        """The training progress ``min(steps / total_steps, 1)`` of the next step."""
        if self.total_steps is None:
            raise ValueError(
                "DANN's λ ramp needs the training length: pass total_steps= (epochs × batches "
                "per epoch) or set objective.total_steps, or use schedule='constant'"
            )
        return min(int(self.steps) / self.total_steps, 1.0)

    def reverse_weight(self) -> float:
        """The reversal weight λ of the next training step (see the class docstring)."""
        if self.schedule == "constant":
            return float(self.weight)
        return dann_lambda(self.progress(), self.weight)

    def forward(self, logits: Tensor, features: Tensor, labels: Tensor, rows: Tensor) -> Tensor:
        """The batch's training loss (see the module docstring)."""
        conf = self.confounder(rows)
        lam = self.reverse_weight()
        if self.training and torch.is_grad_enabled():
            self.steps += 1
        rev = grad_reverse(features.flatten(1), lam)
        adv = features.new_zeros(())
        for c, head in enumerate(self.heads):
            sel = labels == c if self.conditional else torch.ones_like(labels, dtype=torch.bool)
            target = torch.bucketize(conf[sel], self.edges[c])
            if target.numel():
                adv = adv + F.cross_entropy(head(rev[sel]), target, reduction="sum")
        return self.task(logits, labels) + adv / len(labels)

    def extra_repr(self) -> str:  # noqa: D102 (nn.Module hook)
        return (
            f"conditional={self.conditional}, bins={self.bins}, weight={self.weight}, "
            f"schedule={self.schedule!r}, total_steps={self.total_steps}"
        )


class GroupDROObjective(_Objective):
    """Group DRO over label × confounder-bin groups; see the module docstring.

    Args:
        design: the training design.
        bins: quantile bins of the confounder (global edges). Default: 4.
        step_size: η of the exponentiated-gradient update of the group weights. Default: 0.01.
        num_classes: labels. Default: from the design's kept label column (else 2).
    """

    edges: Tensor
    q: Tensor

    def __init__(
        self,
        design: Design,
        *,
        bins: int = 4,
        step_size: float = 0.01,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(design)
        if num_classes is None:
            labels = self._train_labels
            num_classes = 2 if labels is None else int(labels.max()) + 1
        self.bins, self.step_size, self.num_classes = bins, step_size, num_classes
        self.register_buffer("edges", quantile_edges(self._train_conf, bins))
        groups = num_classes * bins
        self.register_buffer("q", torch.full((groups,), 1.0 / groups))

    def group(self, labels: Tensor, rows: Tensor) -> Tensor:
        """The group of each sample: ``label · bins + bin``."""
        return labels.long() * self.bins + torch.bucketize(self.confounder(rows), self.edges)

    def group_losses(self, per_sample: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
        """Mean loss of each group and whether it is present, both ``(G,)``."""
        onehot = F.one_hot(groups, len(self.q)).to(per_sample.dtype)
        counts = onehot.sum(0)
        return (onehot.T @ per_sample) / counts.clamp_min(1.0), counts > 0

    def weighted(self, per_sample: Tensor, groups: Tensor) -> Tensor:
        """Updates ``q`` (in training mode) and returns ``Σ_g q_g · loss_g``."""
        losses, present = self.group_losses(per_sample, groups)
        if self.training:
            with torch.no_grad():
                q = self.q * torch.exp(self.step_size * losses * present)
                self.q.copy_(q / q.sum())
        w = self.q * present
        return (w * losses).sum() / w.sum()

    def forward(self, logits: Tensor, features: Tensor, labels: Tensor, rows: Tensor) -> Tensor:
        """The batch's training loss (see the module docstring)."""
        if logits.shape[1] == 1:
            per = F.binary_cross_entropy_with_logits(
                logits[:, 0], labels.to(logits.dtype), reduction="none"
            )
        else:
            per = F.cross_entropy(logits, labels, reduction="none")
        return self.weighted(per, self.group(labels, rows))


#: ``factory(design, features, **settings) -> nn.Module``: a training objective for the training
#: design and the width of the model's features.
ObjectiveFactory = Callable[..., nn.Module]


def _brnet(design: Design, features: int, **settings: Any) -> nn.Module:
    return BRNetObjective(design, features, **settings)


def _brnet_cond(design: Design, features: int, **settings: Any) -> nn.Module:
    return BRNetObjective(design, features, conditional=True, **settings)


def _dann(design: Design, features: int, **settings: Any) -> nn.Module:
    return DANNObjective(design, features, **settings)


def _dann_cond(design: Design, features: int, **settings: Any) -> nn.Module:
    return DANNObjective(design, features, conditional=True, **settings)


def _groupdro(design: Design, features: int, **settings: Any) -> nn.Module:
    return GroupDROObjective(design, **settings)


#: The training objectives by name (a method's
#: :attr:`~metanorm_repro.models.methods.Method.objective`); :func:`register_objective` adds one.
OBJECTIVES: dict[str, ObjectiveFactory] = {
    "brnet": _brnet,
    "brnet-cond": _brnet_cond,
    "dann": _dann,
    "dann-cond": _dann_cond,
    "groupdro": _groupdro,
}


def register_objective(name: str, factory: ObjectiveFactory, *, replace: bool = False) -> None:
    """Adds a training objective to :data:`OBJECTIVES` under ``name``.

    Args:
        name: the objective's name (what a method's ``objective`` names).
        factory: ``factory(design, features, **settings)`` returning an ``nn.Module`` called as
            ``objective(logits, features, labels, rows)`` for a training batch's loss.
        replace: replace an existing objective. Default: ``False`` (a ``ValueError``).

    Raises:
        TypeError: ``name`` is not a non-empty string or ``factory`` is not callable.
        ValueError: ``name`` is taken.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"expected a non-empty str name, got {name!r}")
    if not callable(factory):
        raise TypeError(f"expected a callable factory, got {type(factory).__name__}")
    if name in OBJECTIVES and not replace:
        raise ValueError(f"an objective named {name!r} is already registered")
    OBJECTIVES[name] = factory


def make_objective(name: str, design: Design, features: int, **settings: Any) -> nn.Module:
    """The objective named ``name`` of :data:`OBJECTIVES` (a method's ``objective``).

    Args:
        name: ``"brnet"``, ``"brnet-cond"``, ``"dann"``, ``"dann-cond"``, ``"groupdro"`` or a
            registered one.
        design: the training design.
        features: the width of the model's features.
        **settings: keyword arguments of the objective's class.

    Raises:
        ValueError: an unknown objective (the message lists them).
    """
    factory = OBJECTIVES.get(name) if isinstance(name, str) else None
    if factory is None:
        raise ValueError(f"expected an objective in {', '.join(OBJECTIVES)}, got {name!r}")
    return factory(design, features, **settings)


def attach_objective(
    model: nn.Module, method: str, design: Design, features: int, **settings: Any
) -> nn.Module:
    """Sets ``model.objective`` to the objective of ``method`` if it has one; returns ``model``.

    ``settings``: keyword arguments of the objective's class (:func:`make_objective`).
    """
    name = get_method(method).objective
    if name is not None:
        model.objective = make_objective(name, design, features, **settings)
    return model


def plot_bacc_vs_dcor2(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Scatter of test bAcc against the mean per-class test dcor², one point per method × batch.

    The sweep's report draws this plot itself (``bacc_vs_dcor2.png``); this draws it again from
    summary rows, with the synthetic task's reference accuracies
    (``metanorm_repro.experiments.plots.plot_bacc_vs_dcor2``).

    Args:
        rows: the summary rows of a sweep (``results.json``'s ``"rows"``).
        path: the PNG to write.

    Returns:
        ``path``.
    """
    return plots.plot_bacc_vs_dcor2(
        rows, path, confounder="cf", reference=SYNTHETIC_REFERENCE_ACCURACIES
    )
