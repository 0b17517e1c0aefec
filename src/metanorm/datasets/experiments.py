"""What each real-data experiment needs: splits, metadata roles and a model factory.

The engine runs these as named experiments (:mod:`metanorm.experiments.real`,
``metanorm reproduce NAME``): it trains ``model_factory(method, design)`` on ``splits["train"]``
with the design rows as the metadata argument, and evaluates on ``"val"`` and on every split in
``eval_splits``: bAcc, accuracy per ``group_column`` value, and per-class dcor² between the
model's features and the metric matrix. :meth:`RealExperiment.design` and
:meth:`RealExperiment.metric_matrix` give the same rows and matrices as the engine (one coding,
:mod:`metanorm.datasets._coding`), for use outside it.

Factories (see :data:`REAL_EXPERIMENTS`):

=========================  ==========================================  ======================
name                       data                                         needs ``root``
=========================  ==========================================  ======================
``shaded-fashion-mnist``   Fashion-MNIST shirt/T-shirt + shade           no (installs here)
``shaded-mnist``           MNIST 5k 4/9 + shade                          no (installs here)
``two-site-digits``        optdigits (site 0) + MNIST (site 1)           no (installs here)
``gs-ppb``                 user's GS-PPB faces, skin type                yes
``hvu``                    user's HVU clip features, scene tags          yes
``multisite-mri``          user's NIfTI volumes, site/age/sex            yes
=========================  ==========================================  ======================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from metanorm.datasets import _coding
from metanorm.datasets._base import DataSplit
from metanorm.datasets.images import make_shaded_images, make_two_site_digits
from metanorm.datasets.paper import load_gs_ppb, load_hvu, load_multisite_mri
from metanorm.design import Design, DesignBuilder
from metanorm.models.stand_in import StandInCNN, StandInCNN3d, StandInMLP

__all__ = [
    "LABEL",
    "REAL_EXPERIMENTS",
    "RealExperiment",
    "gs_ppb",
    "hvu",
    "multisite_mri",
    "real_experiment",
    "shaded_images",
    "two_site_digits",
]

#: Name of the label column in every design (kept, never removed); the engine's name.
LABEL = _coding.LABEL

ModelFactory = Callable[..., nn.Module]


@dataclass
class RealExperiment:
    """A real-data experiment's data and roles.

    Attributes:
        name: the experiment's name.
        description: one line for reports.
        splits: ``"train"``, ``"val"`` and the test splits.
        num_classes: number of classes (logits have this many columns).
        design_columns: metadata columns MDN removes (with the label kept and an intercept).
        categorical: the design/metric columns to one-hot code.
        metric_columns: metadata the bias metric (per-class dcor² with the features) is
            computed against.
        group_column: metadata column for accuracy per group (shade bin, site, skin type), or
            ``None``.
        eval_splits: the test splits to report.
        model_factory: ``factory(norm, design, **options) -> model`` (see
            :mod:`metanorm.models.stand_in`; ``design`` is ``None`` unless ``norm`` uses MDN;
            options such as ``momentum`` go to the model's constructor).
        expected: what the experiment should show, for reports.
    """

    name: str
    description: str
    splits: dict[str, DataSplit]
    num_classes: int
    design_columns: tuple[str, ...]
    categorical: tuple[str, ...]
    metric_columns: tuple[str, ...]
    group_column: str | None
    eval_splits: tuple[str, ...]
    model_factory: ModelFactory
    expected: str = ""
    _builder: DesignBuilder | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for s in ("train", "val", *self.eval_splits):
            if s not in self.splits:
                raise ValueError(
                    f"experiment {self.name!r} has no split {s!r}: {list(self.splits)}"
                )
        for c in (*self.design_columns, *self.metric_columns, self.group_column):
            if c is not None and c not in self.splits["train"].metadata:
                raise ValueError(
                    f"experiment {self.name!r}: metadata column {c!r} not in the training split "
                    f"({list(self.splits['train'].metadata)})"
                )

    @property
    def builder(self) -> DesignBuilder:
        """The :class:`~metanorm.design.DesignBuilder`, fitted on the training split.

        The engine's one coding (:mod:`metanorm.datasets._coding`): the label raw (``"y"``,
        0/1, for two classes; one-hot ``"y=1"``, … with class 0 as reference for more; kept), the
        design columns (removed; continuous ones standardised with the training mean and standard
        deviation, categorical ones one-hot with a reference level), the intercept (removed).
        """
        if self._builder is None:
            self._builder = _coding.fit_design_builder(
                self.splits["train"],
                self.design_columns,
                categorical=self.categorical,
                standardize=True,
            )
        return self._builder

    def design(self, split: str = "train", *, labels: bool = True) -> Design:
        """The design of a split (label kept, metadata and intercept removed).

        Args:
            split: the split's name.
            labels: use the true labels in the kept columns. With ``False`` they are zero: at
                evaluation MDN ignores kept columns, so test rows never need labels.
        """
        data = _coding.design_data(self.splits[split], self.design_columns, labels=labels)
        return self.builder.transform(data)

    def design_rows(self, split: str = "train", *, labels: bool = True) -> torch.Tensor:
        """:meth:`design` as a float32 ``(n, K)`` tensor: the metadata argument of the models."""
        return self.design(split, labels=labels).tensor()

    def make_model(self, norm: str = "batchnorm", **options: Any) -> nn.Module:
        """A fresh model; MDN variants get the whole training design.

        Args:
            norm: one of :data:`metanorm.models.stand_in.NORMS`.
            **options: passed to the model's constructor (e.g. ``momentum=None`` for MDN's
                cumulative running β, ``hidden=``).
        """
        design = self.design("train") if norm.startswith("mdn") else None
        return self.model_factory(norm, design, **options)

    def metric_matrix(self, split: str) -> np.ndarray:
        """The metadata for the bias metric, ``(n, p)`` float64.

        Metric columns as they are, categorical ones one-hot coded with every training level (no
        intercept, not standardised).
        """
        return _coding.metric_matrix(
            self.splits[split], self.splits["train"], self.metric_columns, self.categorical
        )

    def groups(self, split: str) -> np.ndarray | None:
        """The group of every sample of a split (for per-group accuracy), or ``None``."""
        if self.group_column is None:
            return None
        return np.asarray(self.splits[split].metadata[self.group_column])


def _image_factory(in_channels: int, num_classes: int, size: int) -> ModelFactory:
    def factory(norm: str, design: Design | None, **options: Any) -> nn.Module:
        return StandInCNN(in_channels, num_classes, size, norm, design, **options)

    return factory


def shaded_images(*, source: str = "fashion-mnist", seed: int = 0, **kwargs: Any) -> RealExperiment:
    """The GS-PPB stand-in: a hard binary pair of real images with a shade confounder.

    Args:
        source: ``"fashion-mnist"`` or ``"mnist-5k"``.
        seed: data seed.
        **kwargs: passed to :func:`metanorm.datasets.images.make_shaded_images` (``path``,
            ``classes``, sizes, ``strength``).
    """
    splits = make_shaded_images(source=source, seed=seed, **kwargs)
    evals = ("test", "test_reversed") if "test_reversed" in splits else ("test",)
    return RealExperiment(
        name="shaded-fashion-mnist" if source == "fashion-mnist" else "shaded-mnist",
        description=f"{source} binary pair, shade c associated with the label in train/val, "
        "independent at test, reversed in test_reversed",
        splits=splits,
        num_classes=2,
        design_columns=("shade",),
        categorical=(),
        metric_columns=("shade",),
        group_column="shade_bin",
        eval_splits=evals,
        model_factory=_image_factory(1, 2, splits["train"].images.shape[-1]),
        expected="the baseline's bAcc falls from test to test_reversed; MDN's much less, and "
        "MDN's per-class dcor² of the features with the shade is near 0",
    )


def two_site_digits(*, seed: int = 0, **kwargs: Any) -> RealExperiment:
    """The multi-site stand-in: optdigits (site 0) and MNIST (site 1), site ↔ label in training.

    Args:
        seed: data seed.
        **kwargs: passed to :func:`metanorm.datasets.images.make_two_site_digits`.
    """
    splits = make_two_site_digits(seed=seed, **kwargs)
    n_cls = int(splits["train"].labels.max()) + 1
    return RealExperiment(
        name="two-site-digits",
        description="optdigits (site 0) vs MNIST (site 1), site associated with the label in "
        "train/val, balanced in test, minority cells only in test_reversed",
        splits=splits,
        num_classes=n_cls,
        design_columns=("site",),
        categorical=("site",),
        metric_columns=("site",),
        group_column="site",
        eval_splits=("test", "test_reversed"),
        model_factory=_image_factory(1, n_cls, splits["train"].images.shape[-1]),
        expected="the baseline is worse on the minority (class, site) cells; MDN closes the gap "
        "and its per-class dcor² with the site is near 0",
    )


def gs_ppb(
    root: str | os.PathLike[str], *, skin_type: str = "categorical", seed: int = 0, **kwargs: Any
) -> RealExperiment:
    """GS-PPB from user-supplied files: gender from faces, skin type as metadata.

    Args:
        root: the data folder (layout: :func:`metanorm.datasets.paper.load_gs_ppb`).
        skin_type: ``"categorical"`` (one-hot, 5 design columns) or ``"ordinal"`` (one numeric
            column, a linear effect of the type).
        seed: split seed.
        **kwargs: passed to the loader.
    """
    if skin_type not in ("categorical", "ordinal"):
        raise ValueError(f"expected skin_type 'categorical' or 'ordinal', got {skin_type!r}")
    splits = load_gs_ppb(root, seed=seed, **kwargs)
    x = splits["train"].images
    return RealExperiment(
        name="gs-ppb",
        description=f"GS-PPB gender, Fitzpatrick skin type as {skin_type} metadata",
        splits=splits,
        num_classes=2,
        design_columns=("skin_type",),
        categorical=("skin_type",) if skin_type == "categorical" else (),
        metric_columns=("skin_type",),
        group_column="skin_type",
        eval_splits=("test",),
        model_factory=_image_factory(int(x.shape[1]), 2, int(x.shape[-1])),
        expected="accuracy per skin type more even with MDN; dcor² with skin type lower",
    )


def hvu(root: str | os.PathLike[str], *, seed: int = 0, **kwargs: Any) -> RealExperiment:
    """HVU from user-supplied clip features: primary action from features, scenes as metadata.

    Args:
        root: the data folder (layout: :func:`metanorm.datasets.paper.load_hvu`).
        seed: split seed.
        **kwargs: passed to the loader (``num_actions``, ``min_scene_count``, ...).
    """
    splits = load_hvu(root, seed=seed, **kwargs)
    scenes = tuple(c for c in splits["train"].metadata if c.startswith("scene="))
    if not scenes:
        raise ValueError("no scene tag is frequent enough to be metadata; lower min_scene_count")
    n_cls = int(max(int(s.labels.max()) for s in splits.values() if len(s)) + 1)
    width = int(splits["train"].images.shape[1])

    def factory(norm: str, design: Design | None, **options: Any) -> nn.Module:
        options.setdefault("dropout", 0.2)
        return StandInMLP(width, n_cls, norm, design, **options)

    return RealExperiment(
        name="hvu",
        description="HVU clip features → primary action; multi-hot scene tags as metadata",
        splits=splits,
        num_classes=n_cls,
        design_columns=scenes,
        categorical=(),
        metric_columns=scenes,
        group_column=None,
        eval_splits=("test",),
        model_factory=factory,
        expected="MDN lowers the features' dcor² with the scene tags at little cost in accuracy",
    )


def multisite_mri(
    root: str | os.PathLike[str],
    *,
    covariates: Sequence[str] = ("site", "age", "sex"),
    seed: int = 0,
    **kwargs: Any,
) -> RealExperiment:
    """Multi-site MRI from user-supplied NIfTI volumes: diagnosis, site (+ age, sex) removed.

    Args:
        root: the data folder (layout: :func:`metanorm.datasets.paper.load_multisite_mri`).
        covariates: metadata columns MDN removes, among ``site``, ``age``, ``sex``.
        seed: split seed.
        **kwargs: passed to the loader (``volume_shape``, ...).
    """
    bad = [c for c in covariates if c not in ("site", "age", "sex")]
    if bad or not covariates:
        raise ValueError(f"expected covariates among ('site', 'age', 'sex'), got {covariates}")
    splits = load_multisite_mri(root, seed=seed, **kwargs)
    n_cls = int(max(int(s.labels.max()) for s in splits.values() if len(s)) + 1)
    shape = tuple(int(s) for s in splits["train"].images.shape[2:])

    def factory(norm: str, design: Design | None, **options: Any) -> nn.Module:
        return StandInCNN3d(1, n_cls, shape, norm, design, **options)

    return RealExperiment(
        name="multisite-mri",
        description=f"diagnosis from T1 volumes; {', '.join(covariates)} as metadata",
        splits=splits,
        num_classes=n_cls,
        design_columns=tuple(covariates),
        categorical=tuple(c for c in covariates if c in ("site", "sex")),
        metric_columns=("site",),
        group_column="site",
        eval_splits=("test",),
        model_factory=factory,
        expected="accuracy per site more even with MDN; dcor² with the site lower",
    )


#: name → (factory, needs a data root). Factories take ``root`` first when they need one.
REAL_EXPERIMENTS: Mapping[str, tuple[Callable[..., RealExperiment], bool]] = {
    "shaded-fashion-mnist": (lambda **kw: shaded_images(source="fashion-mnist", **kw), False),
    "shaded-mnist": (lambda **kw: shaded_images(source="mnist-5k", **kw), False),
    "two-site-digits": (two_site_digits, False),
    "gs-ppb": (gs_ppb, True),
    "hvu": (hvu, True),
    "multisite-mri": (multisite_mri, True),
}


def real_experiment(
    name: str, root: str | os.PathLike[str] | None = None, **kwargs: Any
) -> RealExperiment:
    """Builds a real-data experiment by name (see :data:`REAL_EXPERIMENTS`).

    Args:
        name: the experiment's name.
        root: the data folder, for experiments on user-supplied data.
        **kwargs: passed to the factory.

    Raises:
        ValueError: unknown name, or a missing ``root`` where one is needed.
    """
    if name not in REAL_EXPERIMENTS:
        raise ValueError(f"unknown real experiment {name!r}; known: {sorted(REAL_EXPERIMENTS)}")
    factory, needs_root = REAL_EXPERIMENTS[name]
    if needs_root:
        if root is None:
            raise ValueError(f"experiment {name!r} needs the data folder (root=, --data PATH)")
        return factory(root, **kwargs)
    if root is not None:
        if not name.startswith("shaded"):
            raise ValueError(
                f"experiment {name!r} takes no root; pass mnist_path= / optdigits_path= to "
                "point at other copies of its data"
            )
        kwargs.setdefault("path", root)
    return factory(**kwargs)
