"""The paper's real-data experiments and their stand-ins, for ``metanorm reproduce NAME``.

Each is an :class:`~metanorm_repro.experiments.Experiment` over a data set of
:mod:`metanorm_repro.datasets` and a stand-in model of :mod:`metanorm_repro.models.stand_in`, so
that it runs through the same engine, sweep and report as the synthetic experiment:

=========================  =====================================  ==============================
name                       data                                   metadata (design, dcor²)
=========================  =====================================  ==============================
``shaded-fashion-mnist``   Fashion-MNIST T-shirt/shirt + shade    shade (continuous)
``shaded-mnist``           MNIST 5k 4/9 + shade                   shade (continuous)
``two-site-digits``        optdigits (site 0) + MNIST (site 1)    site (one-hot)
``gs-ppb``                 ``--data``: faces + metadata.csv       Fitzpatrick skin type (one-hot)
``hvu``                    ``--data``: clip features + CSV        scene tags (multi-hot)
``multisite-mri``          ``--data``: NIfTI + participants.csv   site, age, sex (dcor²: site)
``multisite-mri-standin``  MNI152 GM template + atrophy, 3 sites  site, age, sex (dcor²: site)
=========================  =====================================  ==============================

Methods: ``batchnorm`` (the usual model, BatchNorm after every layer; the baseline) and ``mdn``
(BatchNorm in the convs, MetadataNorm on the penultimate layer); with ``--methods``: ``none``,
``mdn-all`` (MDN after every layer), the alternatives to MDN ``concat``, ``concat-input``,
``brnet``, ``brnet-cond``, ``dann``, ``dann-cond``, ``groupdro`` (``docs/alternatives.md``; their
training objective is attached to the stand-in model by
:func:`~metanorm_repro.experiments.alternatives.attach_objective`), and the candidate fixes of
``docs/failures.md`` ``mdn-cw``, ``mdn-poly``, ``mdn-scale``, ``mdn+brnet-cond``
(:mod:`metanorm_repro.models.interaction_norms`). Every test split is evaluated: the
shaded and two-site experiments have ``test`` (confounder independent of / balanced with the
label) and ``test_reversed`` (association reversed / minority cells only).

Run options (:attr:`RunConfig.options`): ``data`` (the data folder, ``--data``; for the shaded
experiments another copy of the source's files), the design options ``skin_type``
(gs-ppb: ``"categorical"``, the default, or ``"ordinal"``) and ``covariates`` (multisite-mri:
the removed columns among ``site``, ``age``, ``sex``), and every other keyword argument of the
data set's loader, e.g. ``shade_mode``, ``noise``, ``classes``, ``min_scene_count``,
``image_size``. ``n_per_class`` sets the training size of the shaded experiments
(``n_train = 2 × n_per_class``) and ``n_eval_per_class`` their validation and test sizes; the
other experiments use all their data.

Examples::

    >>> from metanorm_repro.experiments import RunConfig, prepare_run
    >>> config = RunConfig("gs-ppb", method="mdn", options={"data": "/data/ppb"})
    >>> run = prepare_run(config)  # doctest: +SKIP
    >>> logits, features = run.model(run.splits[0].images[:32], run.rows[0][:32])  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from torch import nn

from metanorm.datasets import DataSplit, load_gs_ppb, load_hvu, load_multisite_mri
from metanorm.design import Design
from metanorm_repro.datasets import (
    make_multisite_mri_standin,
    make_shaded_images,
    make_two_site_digits,
)
from metanorm_repro.experiments.alternatives import attach_objective
from metanorm_repro.experiments.config import RunConfig
from metanorm_repro.experiments.registry import Check, Experiment
from metanorm_repro.models.methods import ALTERNATIVES, FAILURE_METHODS, get_method
from metanorm_repro.models.stand_in import StandInCNN, StandInCNN3d, StandInMLP

__all__ = ["DATA_SOURCES", "LAYOUTS", "METHODS", "DataSource", "load_splits", "shade_bins"]

#: Methods every real-data experiment accepts (one list, shared by the seven experiments of this
#: module; each runs ``batchnorm`` and ``mdn`` by default). After the MDN
#: variants come the alternatives to MDN (``docs/alternatives.md``), the candidate fixes for
#: effects a linear removal cannot reach (``docs/failures.md``) and the location-scale layer
#: (``mdn-ls``, ``docs/estimators.md``; no study runs it by default).
METHODS = (
    "batchnorm",
    "mdn",
    "none",
    "mdn-all",
    *ALTERNATIVES,
    *FAILURE_METHODS,
    "mdn-ls",
)

#: The on-disk layout each user-data experiment expects under ``--data PATH``.
LAYOUTS: dict[str, str] = {
    "gs-ppb": "PATH/metadata.csv (filename,gender,skin_type[,split]) and PATH/images/<filename>",
    "hvu": "PATH/annotations.csv (clip_id,action_tags,scene_tags[,split]; tags joined by '|') "
    "and PATH/features/<clip_id>.npy, or PATH/features.npy + PATH/features_clips.txt",
    "multisite-mri": "PATH/participants.csv (subject,diagnosis,site,age,sex[,path][,split]) and "
    "PATH/volumes/<subject>.nii.gz (needs nibabel: pip install 'metanorm[mri]')",
}

Splits = dict[str, DataSplit]
ModelFactory = Callable[[Splits, str, "Design | None", RunConfig], nn.Module]


@dataclass(frozen=True)
class DataSource:
    """How a real-data experiment gets its data and builds its model.

    Attributes:
        load: ``load(root, seed=, **loader options) -> {split name: DataSplit}``; ``root`` is the
            ``data`` option (``--data``) or ``None``.
        model: ``model(splits, method, design, config) -> nn.Module``, the stand-in model.
        loader: the function whose arguments are the experiment's loader options, but for
            ``root`` (the data folder), ``seed`` and ``source``. Default: ``load``.
        design_options: options of the design, not of the loader.
        model_options: options of the model factory, not of the loader.
    """

    load: Callable[..., Splits]
    model: ModelFactory
    loader: Callable[..., Any] | None = None
    design_options: tuple[str, ...] = ()
    model_options: tuple[str, ...] = ()


def _shaded(source: str) -> Callable[..., Splits]:
    def load(root: str | None, **kwargs: Any) -> Splits:
        if root is not None:
            kwargs.setdefault("path", root)
        return make_shaded_images(source=source, **kwargs)

    return load


def _two_sites(root: str | None, **kwargs: Any) -> Splits:
    if root is not None:
        raise ValueError(
            "experiment 'two-site-digits' takes no data folder; pass --option mnist_path=... / "
            "optdigits_path=... to point at other copies of its data"
        )
    return make_two_site_digits(**kwargs)


def _mri_standin(root: str | None, **kwargs: Any) -> Splits:
    if root is not None:
        raise ValueError("experiment 'multisite-mri-standin' takes no data folder (--data)")
    return make_multisite_mri_standin(**kwargs)


def _hvu(root: str, **kwargs: Any) -> Splits:
    splits = load_hvu(root, **kwargs)
    if not any(c.startswith("scene=") for c in splits["train"].metadata):
        raise ValueError("no scene tag is frequent enough to be metadata; lower min_scene_count")
    return splits


def _num_classes(splits: Splits) -> int:
    return int(max(int(s.labels.max()) for s in splits.values() if len(s)) + 1)


def _image_model(splits: Splits, method: str, design: Design | None, c: RunConfig) -> nn.Module:
    x = splits["train"].images
    n_cls = _num_classes(splits)
    return StandInCNN(int(x.shape[1]), n_cls, int(x.shape[-1]), method, design, momentum=c.momentum)


def _mlp_model(splits: Splits, method: str, design: Design | None, c: RunConfig) -> nn.Module:
    width = int(splits["train"].images.shape[1])
    n_cls = _num_classes(splits)
    return StandInMLP(width, n_cls, method, design, dropout=0.2, momentum=c.momentum)


#: The ``model`` option of the volume experiments: the stand-in 3-D CNN or MONAI's ResNet-18.
VOLUME_MODELS = ("stand-in-cnn3d", "monai-resnet18")


def _volume_model(splits: Splits, method: str, design: Design | None, c: RunConfig) -> nn.Module:
    shape = tuple(int(s) for s in splits["train"].images.shape[2:])
    model = c.options.get("model", VOLUME_MODELS[0])
    if model == "monai-resnet18":  # MONAI is optional: imported only here
        from metanorm_repro.models.monai_models import monai_resnet18

        width = float(c.options.get("widen_factor", 1.0))
        return monai_resnet18(
            1, _num_classes(splits), shape, method, design, widen_factor=width, momentum=c.momentum
        )
    if model != VOLUME_MODELS[0]:
        raise ValueError(f"expected the option model in {VOLUME_MODELS}, got {model!r}")
    if "widen_factor" in c.options:
        raise ValueError("the option widen_factor is for model=monai-resnet18")
    return StandInCNN3d(1, _num_classes(splits), shape, method, design, momentum=c.momentum)


#: The data of each real-data experiment, by the experiment's name.
DATA_SOURCES: dict[str, DataSource] = {
    "shaded-fashion-mnist": DataSource(
        _shaded("fashion-mnist"), _image_model, loader=make_shaded_images
    ),
    "shaded-mnist": DataSource(_shaded("mnist-5k"), _image_model, loader=make_shaded_images),
    "two-site-digits": DataSource(_two_sites, _image_model, loader=make_two_site_digits),
    "gs-ppb": DataSource(load_gs_ppb, _image_model, design_options=("skin_type",)),
    "hvu": DataSource(_hvu, _mlp_model, loader=load_hvu),
    "multisite-mri": DataSource(
        load_multisite_mri,
        _volume_model,
        design_options=("covariates",),
        model_options=("model", "widen_factor"),
    ),
    "multisite-mri-standin": DataSource(
        _mri_standin,
        _volume_model,
        loader=make_multisite_mri_standin,
        design_options=("covariates",),
        model_options=("model", "widen_factor"),
    ),
}


def _option_keys(name: str) -> tuple[str, ...]:
    """The keys of :attr:`RunConfig.options` an experiment accepts.

    They are its loader's keyword arguments, its design options, ``data`` and
    ``n_eval_per_class``.
    """
    source = DATA_SOURCES[name]
    params = inspect.signature(source.loader or source.load).parameters.values()
    keys = [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in ("root", "seed", "source")  # the data folder, the run's seed
    ]
    extra = (*source.design_options, *source.model_options)
    return tuple(sorted({*keys, *extra, "data", "n_eval_per_class"}))


def _loader_options(name: str, options: dict[str, Any], n_per_class: int) -> dict[str, Any]:
    source = DATA_SOURCES[name]
    skip = ("data", "n_eval_per_class", *source.design_options, *source.model_options)
    kw = {k: v for k, v in options.items() if k not in skip}
    if name.startswith("shaded"):
        kw.setdefault("n_train", 2 * n_per_class)
        n_eval = options.get("n_eval_per_class")
        if n_eval is not None:
            kw.setdefault("n_val", 2 * int(n_eval))
            kw.setdefault("n_test", 2 * int(n_eval))
    for k, v in kw.items():
        if isinstance(v, list):  # JSON gives lists; the loaders take tuples
            kw[k] = tuple(v)
    return kw


@lru_cache(maxsize=2)
def _cached(name: str, data: str | None, seed: int, n_per_class: int, opts: str) -> Splits:
    kwargs = _loader_options(name, json.loads(opts), n_per_class)
    return DATA_SOURCES[name].load(data, seed=seed, **kwargs)


def load_splits(name: str, config: RunConfig) -> Splits:
    """The splits of a real-data experiment's run, by name (cached: a sweep group shares them).

    Args:
        name: the experiment's name.
        config: the run's configuration (``seed``, ``n_per_class`` and ``options``).

    Returns:
        ``{"train", "val", "test"[, "test_reversed"]}`` → :class:`~metanorm.datasets.DataSplit`.

    Raises:
        ValueError: an experiment on user-supplied data without ``options["data"]`` (the message
            names the expected layout), or an unknown experiment.
    """
    if name not in DATA_SOURCES:
        raise ValueError(f"unknown real-data experiment {name!r}; known: {sorted(DATA_SOURCES)}")
    data = config.options.get("data")
    if name in LAYOUTS and not data:
        raise ValueError(
            f"experiment {name!r} needs the data folder: metanorm reproduce {name} --data PATH, "
            f"with {LAYOUTS[name]}"
        )
    opts = json.dumps(
        {k: v for k, v in config.options.items() if k != "data"}, sort_keys=True, default=str
    )
    root = None if data is None else os.fspath(data)
    return _cached(name, root, config.seed, config.n_per_class, opts)


def _make_splits(name: str) -> Callable[[RunConfig], Sequence[DataSplit]]:
    def make_splits(config: RunConfig) -> Sequence[DataSplit]:
        splits = load_splits(name, config)
        for split_name, s in splits.items():
            s.name = split_name
        tests = [s for k, s in splits.items() if k not in ("train", "val")]
        return (splits["train"], splits["val"], *tests)

    return make_splits


def _make_model(name: str) -> Callable[[str, Design, RunConfig], nn.Module]:
    def make_model(method: str, design: Design, config: RunConfig) -> nn.Module:
        splits = load_splits(name, config)
        spec = get_method(method)
        uses_design = spec.needs_design or spec.concat_metadata or spec.input_metadata
        model = DATA_SOURCES[name].model(splits, method, design if uses_design else None, config)
        fc = model.fc  # every stand-in's feature layer
        if not isinstance(fc, nn.Linear):  # pragma: no cover - the stand-ins' contract
            raise TypeError(f"expected the model's fc to be an nn.Linear, got {type(fc).__name__}")
        model = attach_objective(model, method, design, fc.out_features)
        objective = getattr(model, "objective", None)
        if objective is not None and hasattr(objective, "total_steps"):
            # DANN's λ ramp spans the run: epochs × batches per epoch
            batches = math.ceil(design.shape[0] / config.batch_size)
            objective.total_steps = config.epochs * batches
        return model

    return make_model


def _gs_ppb_design(options: Mapping[str, Any]) -> dict[str, Any]:
    skin_type = options.get("skin_type", "categorical")
    if skin_type not in ("categorical", "ordinal"):
        raise ValueError(f"expected skin_type 'categorical' or 'ordinal', got {skin_type!r}")
    return {"categorical": ("skin_type",) if skin_type == "categorical" else ()}


def _mri_design(options: Mapping[str, Any]) -> dict[str, Any]:
    covariates = tuple(options.get("covariates", ("site", "age", "sex")))
    bad = [c for c in covariates if c not in ("site", "age", "sex")]
    if bad or not covariates:
        raise ValueError(f"expected covariates among ('site', 'age', 'sex'), got {covariates}")
    return {"metadata_columns": covariates}


def _shift_checks(rows: Sequence[dict[str, Any]]) -> list[Check]:
    """The expected direction (not the paper's numbers), MDN against BatchNorm.

    MDN loses less than BatchNorm when the confounder stops agreeing with the label (its bAcc on
    ``test_reversed``, or on ``test`` without it, is at least BatchNorm's), and its features
    depend less on the confounder (its largest per-class test dcor² is lower).
    """
    by = {(r["batch_size"], r["method"]): r for r in rows}
    checks: list[Check] = []
    for (bs, method), r in by.items():
        base = by.get((bs, "batchnorm"))
        if method != "mdn" or base is None:
            continue
        key = "test_reversed_bacc" if "test_reversed_bacc" in r else "test_bacc"
        checks.append(
            Check(
                f"bs={bs}: MDN's {key[:-5]} bAcc ≥ BatchNorm's",
                r[key] >= base[key],
                f"{r[key]:.3f} vs {base[key]:.3f}",
            )
        )
        dc = [k for k in r if k.startswith("test_dcor2_") and not k.endswith("_std")]
        mdn = max(r[k] for k in dc)
        bn = max(base[k] for k in dc)
        checks.append(
            Check(
                f"bs={bs}: MDN's largest per-class test dcor² < BatchNorm's",
                mdn < bn,
                f"{mdn:.3f} vs {bn:.3f}",
            )
        )
    return checks


def shade_bins(split: DataSplit) -> np.ndarray:
    """The shade bin of each sample as a label: ``"[1,2)"``, ..., ``"[4,5)"``, ``"[5,6]"``."""
    b = np.asarray(split.metadata["shade_bin"]).astype(int)
    return np.array([f"[{v},{v + 1}]" if v == 5 else f"[{v},{v + 1})" for v in b])


def _prefixed(column: str) -> Any:
    def groups(split: DataSplit) -> np.ndarray:
        return np.array([f"{column} {v}" for v in np.asarray(split.metadata[column])])

    return groups


_COMMON: dict[str, Any] = {"lr": 1e-3, "seeds": 1}

_SPECS: list[dict[str, Any]] = [
    {
        "name": "shaded-fashion-mnist",
        "description": "The GS-PPB stand-in: Fashion-MNIST T-shirt (0) vs shirt (1) with a "
        "shade swatch c associated with the label in train/val (c ~ U(1,4) | y=0, U(3,6) | y=1), "
        "independent at test, reversed in test_reversed. Design [y, shade, 1], y kept; dcor² "
        "with the shade; accuracy per shade bin.",
        "metadata_columns": ("shade",),
        "confounder": "shade",
        "groups": shade_bins,
        "defaults": {"epochs": 8, "n_per_class": 2000, "batch_sizes": [128], "seeds": 3},
    },
    {
        "name": "shaded-mnist",
        "description": "The GS-PPB stand-in on the MNIST 5k subset (digits 4 vs 9), shade as "
        "in shaded-fashion-mnist.",
        "metadata_columns": ("shade",),
        "confounder": "shade",
        "groups": shade_bins,
        "defaults": {"epochs": 15, "n_per_class": 250, "batch_sizes": [64]},
    },
    {
        "name": "two-site-digits",
        "description": "The multi-site stand-in: digits 4 and 9 from two 'scanners', UCI "
        "optdigits (site 0) and MNIST (site 1), site associated with the label in train/val "
        "(90 %), balanced at test, minority (class, site) cells only in test_reversed. Design "
        "[y, site, 1] (site one-hot); dcor² with the one-hot site; accuracy per site.",
        "metadata_columns": ("site",),
        "confounder": "site",
        "categorical": ("site",),
        "groups": _prefixed("site"),
        "defaults": {"epochs": 30, "batch_sizes": [32], "seeds": 3},
    },
    {
        "name": "gs-ppb",
        "description": "GS-PPB (user-supplied, --data): gender from face images, Fitzpatrick "
        "skin type as categorical metadata (one-hot in the design and in dcor²); accuracy per "
        "skin type.",
        "metadata_columns": ("skin_type",),
        "confounder": "skin_type",
        "categorical": ("skin_type",),
        "groups": _prefixed("skin_type"),
        "configure": _gs_ppb_design,
        "defaults": {"epochs": 20, "batch_sizes": [64]},
    },
    {
        "name": "hvu",
        "description": "HVU (user-supplied, --data): the primary action from clip features, "
        "multi-hot scene tags as metadata (design and dcor² against the scene matrix).",
        "metadata_columns": ("scene=*",),
        "confounder": "scene=*",
        "defaults": {"epochs": 20, "batch_sizes": [128]},
    },
    {
        "name": "multisite-mri",
        "description": "Multi-site MRI (user-supplied, --data): diagnosis from T1 volumes with a "
        "small 3-D CNN; site and sex (one-hot) and age (standardised) in the design, dcor² with "
        "the one-hot site; accuracy per site.",
        "metadata_columns": ("site", "age", "sex"),
        "confounder": "site",
        "categorical": ("site", "sex"),
        "groups": _prefixed("site"),
        "configure": _mri_design,
        "defaults": {"epochs": 20, "batch_sizes": [16]},
    },
    {
        "name": "multisite-mri-standin",
        "description": "The multi-site MRI stand-in: nilearn's MNI152 grey-matter template with "
        "age and diagnosis atrophy and three simulated scanners (scale, bias field, blur, noise); "
        "P(diagnosis=1 | site) = 0.8/0.5/0.2 in train/val, balanced at test, reversed in "
        "test_reversed; 32³ volumes, the small 3-D CNN (--option model=monai-resnet18: MONAI's "
        "3-D ResNet-18). Design and dcor² as in multisite-mri.",
        "metadata_columns": ("site", "age", "sex"),
        "confounder": "site",
        "categorical": ("site", "sex"),
        "groups": _prefixed("site"),
        "configure": _mri_design,
        "defaults": {"epochs": 12, "batch_sizes": [16], "lr_schedule": "cosine", "seeds": 3},
    },
]


def _experiment(spec: dict[str, Any]) -> Experiment:
    name = spec["name"]
    return Experiment(
        name=name,
        description=spec["description"],
        make_splits=_make_splits(name),
        make_model=_make_model(name),
        methods=METHODS,
        metadata_columns=spec["metadata_columns"],
        confounder=spec["confounder"],
        categorical=spec.get("categorical", ()),
        standardize=True,
        groups=spec.get("groups"),
        defaults={**_COMMON, "methods": ["batchnorm", "mdn"], **spec["defaults"]},
        checks=_shift_checks,
        configure=spec.get("configure"),
        options=_option_keys(name),
    )


#: The experiments of this module (registered by the registry's loader).
EXPERIMENTS = tuple(_experiment(spec) for spec in _SPECS)
