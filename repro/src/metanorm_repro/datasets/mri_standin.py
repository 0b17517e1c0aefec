"""The multi-site MRI stand-in: simulated subjects built from real anatomy (the MNI152 template).

The paper's multi-site MRI data cannot be shipped; this stand-in gives a 3-D task with the same
structure from nilearn's MNI152 grey-matter template (nilearn is an optional extra:
``pip install 'metanorm-repro[nilearn]'``; its wheel holds the template, nothing downloads).

Subject model (every subject is the template, changed in intensity only, no deformation):

- **ageing**: grey matter falls by ``age_effect`` (a fraction) per 30 years above 55,
  everywhere;
- **diagnosis** (label 1): a further fall of ``diagnosis_effect`` in a fixed smooth regional
  mask: Gaussian blobs (σ = 16 mm) on both medial temporal lobes (MNI (±26, −22, −14)) and the
  precuneus (0, −58, 32);
- **individual variation**: a smooth random multiplicative field (white noise on a 4³ grid,
  trilinearly upsampled, sd ``individual_sd``).

Site (scanner) effects, applied after: a global intensity scale, a smooth multiplicative bias
field (``exp`` of a second-order polynomial of the coordinates, a random direction per site of
norm ``site_bias``), Gaussian blur of a site-specific σ (in voxels of a 32³ volume, scaled with
the volume) and additive Gaussian noise of a site-specific sd.

Splits: in train and validation the diagnosis is associated with the site (P(diagnosis = 1 |
site) = ``association``, by default 0.8 / 0.5 / 0.2 for three sites); at ``test`` every (site,
diagnosis) cell has the same size; ``test_reversed`` reverses the association
(P(diagnosis = 1 | site k) = ``association[K-1-k]``). Age (U(55, 85)) and sex (F/M, half each)
are independent of everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from metanorm.datasets._base import DataSplit

__all__ = ["load_gm_template", "make_multisite_mri_standin"]

# the template's grid (resolution 2 mm): voxel centres at -98 + 2i, -134 + 2j, -72 + 2k mm
_ORIGIN_MM = (-98.0, -134.0, -72.0)
_EXTENT_MM = (198.0, 234.0, 190.0)  # 99, 117, 95 voxels of 2 mm
_REGIONS_MM = ((26.0, -22.0, -14.0), (-26.0, -22.0, -14.0), (0.0, -58.0, 32.0))
_REGION_SIGMA_MM = 16.0


@lru_cache(maxsize=1)
def _template_2mm() -> np.ndarray:
    try:
        from nilearn import datasets
    except ImportError as err:
        raise ImportError(
            "the multi-site MRI stand-in needs nilearn (it ships the MNI152 templates): "
            "`pip install nilearn` (or `pip install 'metanorm-repro[nilearn]'`)"
        ) from err
    img = datasets.load_mni152_gm_template(resolution=2)
    return np.asarray(img.get_fdata(), dtype=np.float32)


@lru_cache(maxsize=4)
def load_gm_template(volume_shape: tuple[int, int, int] = (32, 32, 32)) -> torch.Tensor:
    """The MNI152 grey-matter template (nilearn's) resampled (trilinear) to ``volume_shape``.

    Cached: later calls with the same shape return the same tensor (do not change it in place).

    Args:
        volume_shape: ``(D, H, W)``.

    Returns:
        float32 ``(D, H, W)``, grey-matter probability in [0, 1].

    Raises:
        ImportError: nilearn is not installed.
    """
    t = torch.as_tensor(_template_2mm())[None, None]
    t = F.interpolate(t, size=volume_shape, mode="trilinear", align_corners=False)
    return t[0, 0].clamp_(0.0, 1.0)


def _grid_mm(shape: tuple[int, int, int]) -> list[torch.Tensor]:
    """The MNI coordinates (mm) of the voxel centres of the resampled grid, one per axis."""
    axes = []
    for n, o, e in zip(shape, _ORIGIN_MM, _EXTENT_MM, strict=True):
        axes.append(o - 1.0 + (torch.arange(n, dtype=torch.float32) + 0.5) * e / n)
    return list(torch.meshgrid(*axes, indexing="ij"))


def _region_mask(shape: tuple[int, int, int]) -> torch.Tensor:
    x, y, z = _grid_mm(shape)
    mask = torch.zeros(shape)
    for cx, cy, cz in _REGIONS_MM:
        d2 = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2
        mask = torch.maximum(mask, torch.exp(-d2 / (2 * _REGION_SIGMA_MM**2)))
    return mask


def _poly_terms(shape: tuple[int, int, int]) -> torch.Tensor:
    """The 9 non-constant terms of a 2nd-order polynomial of [-1, 1] coordinates; (9, D, H, W)."""
    axes = [torch.linspace(-1.0, 1.0, n) for n in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])


def _blur(vols: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(n, D, H, W)`` with σ in voxels (replicate padding)."""
    if sigma <= 0:
        return vols
    r = max(1, int(np.ceil(3 * sigma)))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    h = vols.unsqueeze(1)
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k.numel()
        pad = [0] * 6
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = r
        h = F.conv3d(F.pad(h, pad, mode="replicate"), k.view(shape))
    return h.squeeze(1)


def _check_per_site(name: str, value: Sequence[float], n_sites: int, low: float) -> list[float]:
    vals = [float(v) for v in value]
    if len(vals) != n_sites or any(not np.isfinite(v) or v < low for v in vals):
        raise ValueError(
            f"expected {name} to hold {n_sites} numbers >= {low} (one per site), got {value!r}"
        )
    return vals


def make_multisite_mri_standin(
    *,
    n_per_site: int = 96,
    n_eval_per_site: int = 32,
    association: Sequence[float] = (0.8, 0.5, 0.2),
    volume_shape: Sequence[int] = (32, 32, 32),
    age_effect: float = 0.1,
    diagnosis_effect: float = 0.4,
    individual_sd: float = 0.05,
    site_scale: Sequence[float] = (1.0, 1.3, 0.75),
    site_bias: Sequence[float] = (0.0, 0.2, 0.4),
    site_blur: Sequence[float] = (0.0, 0.6, 1.2),
    site_noise: Sequence[float] = (0.03, 0.06, 0.09),
    normalize: bool = False,
    seed: int = 0,
) -> dict[str, DataSplit]:
    """The 3-D multi-site stand-in: MNI152 grey matter with atrophy, scanners and confounding.

    The subject and site model is in the module docstring. The number of sites is
    ``len(association)``; the per-site parameters (``site_*``) need as many entries.

    Args:
        n_per_site: training subjects per site (validation: ``n_eval_per_site``). Default: 96.
        n_eval_per_site: subjects per site in ``val``, ``test`` and ``test_reversed`` (even: the
            test has ``n_eval_per_site / 2`` per (site, diagnosis) cell). Default: 32.
        association: P(diagnosis = 1 | site k) in train and validation, one per site, each in
            [0, 1]. Default: ``(0.8, 0.5, 0.2)``.
        volume_shape: ``(D, H, W)`` of the volumes. Default: ``(32, 32, 32)``.
        age_effect: fraction of grey matter lost per 30 years above 55. Default: 0.1.
        diagnosis_effect: fraction lost at the centre of the regional mask for diagnosis 1.
            Default: 0.4.
        individual_sd: sd of the smooth individual multiplicative field. Default: 0.05.
        site_scale: global intensity scale per site. Default: ``(1.0, 1.3, 0.75)``.
        site_bias: strength (norm of the polynomial coefficients) of the bias field per site.
            Default: ``(0.0, 0.2, 0.4)``.
        site_blur: Gaussian blur σ per site, in voxels of a 32³ volume. Default:
            ``(0.0, 0.6, 1.2)``.
        site_noise: sd of additive Gaussian noise per site. Default: ``(0.03, 0.06, 0.09)``.
        normalize: z-score every volume (as :func:`~metanorm.datasets.load_multisite_mri` does;
            removes the global scale). Default: ``False``.
        seed: seed of every random choice (the sites' bias directions included).

    Returns:
        ``{"train", "val", "test", "test_reversed"}`` → :class:`~metanorm.datasets.DataSplit`:
        volumes float32 ``(n, 1, D, H, W)``, labels int64 (the diagnosis), metadata
        ``{"site": str array ("siteA", ...), "age": float64, "sex": str ("F"/"M"),
        "diagnosis": int64, "subject": str}``.

    Raises:
        ValueError: a bad size, association or per-site parameter.
        ImportError: nilearn is not installed.

    Examples::

        >>> splits = make_multisite_mri_standin(n_per_site=4, n_eval_per_site=2,
        ...                                     volume_shape=(16, 16, 16))
        >>> splits["train"].images.shape, sorted(splits)
        (torch.Size([12, 1, 16, 16, 16]), ['test', 'test_reversed', 'train', 'val'])
    """
    shape = tuple(int(s) for s in volume_shape)
    if len(shape) != 3 or any(s < 4 for s in shape):
        raise ValueError(f"expected volume_shape (D, H, W) of ints >= 4, got {volume_shape!r}")
    for name, n in (("n_per_site", n_per_site), ("n_eval_per_site", n_eval_per_site)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"expected {name} to be an int >= 2, got {n!r}")
    if n_eval_per_site % 2:
        raise ValueError(f"expected an even n_eval_per_site, got {n_eval_per_site}")
    assoc = [float(p) for p in association]
    if len(assoc) < 2 or any(not 0.0 <= p <= 1.0 for p in assoc):
        raise ValueError(f"expected association: >= 2 probabilities in [0, 1], got {association!r}")
    k_sites = len(assoc)
    scale = _check_per_site("site_scale", site_scale, k_sites, 1e-6)
    bias = _check_per_site("site_bias", site_bias, k_sites, 0.0)
    blur = _check_per_site("site_blur", site_blur, k_sites, 0.0)
    noise = _check_per_site("site_noise", site_noise, k_sites, 0.0)
    for name, v in (("age_effect", age_effect), ("diagnosis_effect", diagnosis_effect)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"expected {name} in [0, 1), got {v!r}")
    if individual_sd < 0:
        raise ValueError(f"expected individual_sd >= 0, got {individual_sd!r}")

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    template = load_gm_template(shape)
    region = _region_mask(shape)
    terms = _poly_terms(shape)
    directions = rng.normal(size=(k_sites, terms.shape[0]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    fields = [
        torch.exp(torch.einsum("t,tdhw->dhw", torch.as_tensor(b * d, dtype=torch.float32), terms))
        for b, d in zip(bias, directions, strict=True)
    ]
    blur_scale = shape[0] / 32.0

    def cohort(split: str, per_site: int, probs: Sequence[float]) -> DataSplit:
        sites = np.repeat(np.arange(k_sites), per_site)
        dx = np.concatenate(
            [rng.permutation(np.arange(per_site) < round(p * per_site)) for p in probs]
        ).astype(np.int64)
        n = sites.size
        age = rng.uniform(55.0, 85.0, size=n)
        sex = np.where(rng.random(n) < 0.5, "F", "M")
        loss = age_effect * torch.as_tensor((age - 55.0) / 30.0, dtype=torch.float32)
        loss = (
            loss.view(n, 1, 1, 1) + diagnosis_effect * torch.as_tensor(dx).view(n, 1, 1, 1) * region
        )
        coarse = torch.randn(n, 1, 4, 4, 4, generator=gen)
        indiv = F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[:, 0]
        vols = template * (1.0 + individual_sd * indiv) * (1.0 - loss)
        vols = vols.clamp_(min=0.0)
        for k in range(k_sites):
            sel = torch.as_tensor(sites == k)
            v = vols[sel] * (scale[k] * fields[k])
            v = _blur(v, blur[k] * blur_scale)
            vols[sel] = v + noise[k] * torch.randn(v.shape, generator=gen)
        if normalize:
            flat = vols.view(n, -1)
            sd = flat.std(dim=1, keepdim=True).clamp_min(1e-8)
            vols = ((flat - flat.mean(dim=1, keepdim=True)) / sd).view_as(vols)
        metadata = {
            "site": np.array([f"site{chr(65 + k)}" for k in sites]),
            "age": age,
            "sex": sex,
            "diagnosis": dx,
            "subject": np.array([f"{split}-{i:04d}" for i in range(n)]),
        }
        return DataSplit(vols.unsqueeze(1).contiguous(), torch.as_tensor(dx), metadata, split)

    return {
        "train": cohort("train", n_per_site, assoc),
        "val": cohort("val", n_eval_per_site, assoc),
        "test": cohort("test", n_eval_per_site, [0.5] * k_sites),
        "test_reversed": cohort("test_reversed", n_eval_per_site, assoc[::-1]),
    }
