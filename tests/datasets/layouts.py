"""Shared test helpers: fake data folders in the loaders' documented layouts, and skip marks for
the optional readers (Pillow, nibabel, scikit-learn).

Imported by the tests of :mod:`metanorm.datasets` and, through ``repro/tests/datasets/
standin_layouts.py``, by the harness's tests (``repro/tests/conftest.py`` puts this folder on
``sys.path``).
"""

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

HAVE_PIL = importlib.util.find_spec("PIL") is not None
HAVE_NIBABEL = importlib.util.find_spec("nibabel") is not None
HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None

needs_pil = pytest.mark.skipif(not HAVE_PIL, reason="Pillow not installed (pip install pillow)")
needs_nibabel = pytest.mark.skipif(
    not HAVE_NIBABEL, reason="nibabel not installed (pip install metanorm[mri])"
)
needs_sklearn = pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn not installed")


def write_csv(path: Path, header, rows) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def write_ppb(root: Path, n: int = 36, split: bool = False) -> list[list]:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        gender = ["female", "male"][i % 2]
        skin = 1 + (i // 2) % 6
        name = f"face_{i:03d}." + ("png" if i % 3 else "jpg")
        # the red channel encodes the row, so the test can check pixels travel with labels
        arr = np.zeros((20, 24, 3), dtype=np.uint8)
        arr[..., 0] = 5 * i
        arr[..., 1] = rng.integers(0, 255)
        Image.fromarray(arr).save(root / "images" / name)
        row = [name, gender, skin]
        if split:
            row.append(["train", "train", "val", "test"][i % 4])
        rows.append(row)
    header = ["filename", "gender", "skin_type"] + (["split"] if split else [])
    write_csv(root / "metadata.csv", header, rows)
    return rows


ACTIONS = ["skiing", "surfing", "cooking"]
SCENES = ["snow", "beach", "kitchen", "outdoor"]


def hvu_main_scene(i: int) -> int:
    """Each clip has one main scene, mostly its action's, sometimes another."""
    return (i % 3 + (1 if i % 7 == 0 else 0)) % 3


def write_hvu(root: Path, n: int = 60, layout: str = "files", d: int = 6) -> np.ndarray:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    rows = []
    for i in range(n):
        a = ACTIONS[i % 3]
        extra = "|waterskiing" if i % 5 == 0 else ""
        scenes = ["snow", "beach", "kitchen"][hvu_main_scene(i)]
        if i % 4 == 0 or i % 3 == 0:
            scenes += "|outdoor"
        rows.append([f"clip{i}", a + extra, scenes])
    write_csv(root / "annotations.csv", ["clip_id", "action_tags", "scene_tags"], rows)
    if layout == "files":
        (root / "features").mkdir()
        for i in range(n):
            x = feats[i] if i % 2 else np.stack([feats[i] - 1, feats[i] + 1])  # (T, D) averaged
            np.save(root / "features" / f"clip{i}.npy", x)
    else:
        order = rng.permutation(n)
        np.save(root / "features.npy", feats[order])
        (root / "features_clips.txt").write_text("\n".join(f"clip{i}" for i in order) + "\n")
    return feats


def write_mri(root: Path, n: int = 24, shape=(10, 12, 8), path_column: bool = False) -> None:
    import nibabel as nib

    (root / "volumes").mkdir(parents=True)
    rows = []
    for i in range(n):
        vol = np.full(shape, float(i), dtype=np.float32)
        vol[0, 0, 0] += 1.0  # not constant, so normalisation is defined
        name = f"sub-{i:02d}"
        ext = ".nii.gz" if i % 2 else ".nii"
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(root / "volumes" / f"{name}{ext}"))
        row = [
            name,
            ["control", "patient"][i % 2],
            ["siteA", "siteB", "siteC"][i % 3],
            20 + i,
            ["F", "M"][(i // 2) % 2],
        ]
        if path_column:
            row.append(f"volumes/{name}{ext}")
        rows.append(row)
    header = ["subject", "diagnosis", "site", "age", "sex"] + (["path"] if path_column else [])
    write_csv(root / "participants.csv", header, rows)
