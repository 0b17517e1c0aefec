r"""Training objectives of the alternatives to MDN: BR-Net, DANN and Group DRO (harness side).

A method of :mod:`metanorm.models.norms` whose :attr:`~metanorm.models.norms.NormSpec.objective`
is set trains with one of the objectives here instead of the plain task loss. The experiment's
``make_model`` attaches it to the model (:func:`attach_objective`, as the submodule
``model.objective``, so that the run's optimizer trains its parameters too) and
:func:`~metanorm.experiments.train_one_epoch` calls it on every training batch::

    loss = model.objective(logits, features, labels, rows)

``rows`` are the batch's design rows; the confounder is read from their columns that are neither
kept nor the intercept (:func:`~metanorm.models.norms.confounder_columns`: ``cf`` of
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
  gradient reversal layer (:func:`grad_reverse`) with a constant ``weight``. ``-cond``: one head
  per class, with bins from the quantiles of the confounder within that class.
- :class:`GroupDROObjective` (``"groupdro"``; Sagawa et al., ICLR 2020): groups label × confounder
  bin, exponentiated-gradient group weights ``q ← q · exp(η · loss_g)`` (normalised), loss
  ``Σ_g q_g · loss_g`` over the groups present in the batch.

Settings and measured behaviour: ``docs/alternatives.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metanorm.design import Design
from metanorm.experiments.engine import loss_and_predictions
from metanorm.models.norms import confounder_columns, get_norm

__all__ = [
    "BRNetObjective",
    "DANNObjective",
    "GroupDROObjective",
    "attach_objective",
    "grad_reverse",
    "make_objective",
    "pearson_r2",
    "plot_bacc_vs_dcor2",
    "quantile_edges",
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


class DANNObjective(_Objective):
    """A confounder-bin head behind a gradient reversal layer; see the module docstring.

    Args:
        design: the training design.
        features: the features' width.
        conditional: one head (and bin edges) per class. Default: ``False``.
        bins: quantile bins of the confounder. Default: 4.
        weight: the reversal weight λ (constant). Default: 1.
        hidden: the head's hidden width. Default: 32.
    """

    edges: Tensor

    def __init__(
        self,
        design: Design,
        features: int,
        *,
        conditional: bool = False,
        bins: int = 4,
        weight: float = 1.0,
        hidden: int = 32,
    ) -> None:
        super().__init__(design)
        self.conditional, self.weight, self.bins = conditional, weight, bins
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

    def forward(self, logits: Tensor, features: Tensor, labels: Tensor, rows: Tensor) -> Tensor:
        """The batch's training loss (see the module docstring)."""
        conf = self.confounder(rows)
        rev = grad_reverse(features.flatten(1), self.weight)
        adv = features.new_zeros(())
        for c, head in enumerate(self.heads):
            sel = labels == c if self.conditional else torch.ones_like(labels, dtype=torch.bool)
            target = torch.bucketize(conf[sel], self.edges[c])
            if target.numel():
                adv = adv + F.cross_entropy(head(rev[sel]), target, reduction="sum")
        return self.task(logits, labels) + adv / len(labels)


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


def make_objective(name: str, design: Design, features: int, **settings: Any) -> nn.Module:
    """The objective named ``name`` (a method's ``NormSpec.objective``).

    Args:
        name: ``"brnet"``, ``"brnet-cond"``, ``"dann"``, ``"dann-cond"`` or ``"groupdro"``.
        design: the training design.
        features: the width of the model's features.
        **settings: keyword arguments of the objective's class.
    """
    base, _, suffix = name.partition("-")
    if suffix not in ("", "cond") or base not in ("brnet", "dann", "groupdro"):
        raise ValueError(
            f"expected an objective in brnet, brnet-cond, dann, dann-cond, groupdro, got {name!r}"
        )
    if base == "groupdro":
        if suffix:
            raise ValueError(f"groupdro has no conditional variant, got {name!r}")
        return GroupDROObjective(design, **settings)
    cls = BRNetObjective if base == "brnet" else DANNObjective
    return cls(design, features, conditional=suffix == "cond", **settings)


def attach_objective(model: nn.Module, method: str, design: Design, features: int) -> nn.Module:
    """Sets ``model.objective`` to the objective of ``method`` if it has one; returns ``model``."""
    name = get_norm(method).objective
    if name is not None:
        model.objective = make_objective(name, design, features)
    return model


def _mean_dcor2(row: dict[str, Any], split: str = "test") -> float:
    vals = [
        v
        for k, v in row.items()
        if k.startswith(f"{split}_dcor2_") and not k.endswith("_std") and v is not None
    ]
    return float(np.mean(vals)) if vals else float("nan")


def plot_bacc_vs_dcor2(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Scatter of test bAcc against the mean per-class test dcor², one point per method × batch.

    Args:
        rows: the summary rows of a sweep (``summary.json``'s ``"rows"``).
        path: the PNG to write.

    Returns:
        ``path``.
    """
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "matplotlib is needed for the plots: pip install 'metanorm[plots]'"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from metanorm.models.norms import norm_display_name

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sizes = sorted({int(r["batch_size"]) for r in rows}, reverse=True)
    for bs, marker in zip(sizes, "os^vD", strict=False):
        sel = [r for r in rows if int(r["batch_size"]) == bs]
        xs = [_mean_dcor2(r) for r in sel]
        ys = [float(r["test_bacc"]) for r in sel]
        errs = [float(r.get("test_bacc_std", 0.0)) for r in sel]
        ax.errorbar(xs, ys, yerr=errs, fmt=marker, label=f"batch {bs}", capsize=2)
        for r, x, y in zip(sel, xs, ys, strict=True):
            ax.annotate(
                norm_display_name(r["method"]),
                (x, y),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axhline(0.944, color="grey", lw=0.8, ls="--")
    ax.axhline(0.833, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("test dcor²(fc1 features, cf), mean over the classes")
    ax.set_ylabel("test balanced accuracy")
    ax.legend(fontsize=8)
    out = Path(path)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
