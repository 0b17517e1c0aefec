import numpy as np
import pytest
import torch
from layouts import (
    ACTIONS,
    SCENES,
    hvu_main_scene,
    needs_nibabel,
    needs_pil,
    write_csv,
    write_hvu,
    write_mri,
    write_ppb,
)

from metanorm.datasets import DataNotFoundError
from metanorm.datasets.paper import load_gs_ppb, load_hvu, load_multisite_mri

# -------------------------------------------------------------------------------- GS-PPB


@needs_pil
def test_gs_ppb_layout(tmp_path):
    rows = write_ppb(tmp_path)
    s = load_gs_ppb(tmp_path, image_size=16, seed=1)
    assert set(s) == {"train", "val", "test"}
    assert sum(len(v) for v in s.values()) == 36
    names = set()
    for sp in s.values():
        assert sp.images.shape[1:] == (3, 16, 16) and sp.images.dtype == torch.float32
        for img, y, skin, g, fn in zip(
            sp.images,
            sp.labels,
            sp.metadata["skin_type"],
            sp.metadata["gender"],
            sp.metadata["filename"],
            strict=True,
        ):
            i = int(fn[5:8])
            assert rows[i][1] == g and y.item() == (g == "male") and skin == rows[i][2]
            assert abs(float(img[0].mean()) - 5 * i / 255) < 0.02  # jpg is lossy
            names.add(fn)
    assert len(names) == 36
    # stratified on gender x skin type: 3 of each of the 12 strata -> 60/20/20 per stratum
    strata = {(r[1], r[2]) for r in rows}
    assert len(strata) == 12
    assert all(
        ((s["train"].metadata["gender"] == g) & (s["train"].metadata["skin_type"] == k)).sum()
        in (1, 2)
        for g, k in strata
    )
    grey = load_gs_ppb(tmp_path, image_size=8, grayscale=True)
    assert grey["train"].images.shape[1:] == (1, 8, 8)


@needs_pil
def test_gs_ppb_split_column(tmp_path):
    write_ppb(tmp_path, n=16, split=True)
    s = load_gs_ppb(tmp_path, image_size=8)
    assert [len(s[k]) for k in ("train", "val", "test")] == [8, 4, 4]


@needs_pil
def test_gs_ppb_missing_pieces(tmp_path):
    with pytest.raises(DataNotFoundError, match="GS-PPB folder"):
        load_gs_ppb(tmp_path / "nowhere")
    write_ppb(tmp_path, n=12)
    with pytest.raises(DataNotFoundError, match=r"metadata file not found: looked for .*meta\.csv"):
        load_gs_ppb(tmp_path, metadata_file="meta.csv")
    with pytest.raises(ValueError, match=r"metadata\.csv has no column\(s\) \['fitzpatrick'\]"):
        load_gs_ppb(tmp_path, skin_column="fitzpatrick")
    (tmp_path / "images" / "face_004.png").unlink()
    with pytest.raises(DataNotFoundError, match=r"face_004\.png"):
        load_gs_ppb(tmp_path)


@needs_pil
def test_gs_ppb_bad_skin_type(tmp_path):
    rows = write_ppb(tmp_path, n=12)
    rows[3][2] = 7
    write_csv(tmp_path / "metadata.csv", ["filename", "gender", "skin_type"], rows)
    with pytest.raises(ValueError, match=r"Fitzpatrick.*'7'"):
        load_gs_ppb(tmp_path)


# -------------------------------------------------------------------------------- HVU


@pytest.mark.parametrize("layout", ["files", "matrix"])
def test_hvu_layouts(tmp_path, layout):
    feats = write_hvu(tmp_path, layout=layout)
    s = load_hvu(tmp_path, min_scene_count=3, seed=0)
    assert sum(len(v) for v in s.values()) == 60
    cols = [c for c in s["train"].metadata if c.startswith("scene=")]
    # "outdoor" is in most but not all training clips, every scene is frequent enough
    assert cols == [f"scene={t}" for t in sorted(SCENES)]
    for sp in s.values():
        assert sp.images.shape[1:] == (6,)
        for x, y, clip, act in zip(
            sp.images, sp.labels, sp.metadata["clip_id"], sp.metadata["action"], strict=True
        ):
            i = int(clip[4:])
            np.testing.assert_allclose(x.numpy(), feats[i], atol=1e-6)
            assert act == ACTIONS[i % 3] and y.item() == sorted(ACTIONS).index(act)
            assert sp.metadata["scene=kitchen"][list(sp.metadata["clip_id"]).index(clip)] == (
                hvu_main_scene(i) == 2
            )
    # stratified on the label: 20 clips per action -> 12/4/4
    np.testing.assert_array_equal(np.bincount(s["train"].labels.numpy()), [12, 12, 12])


def test_hvu_filters_and_missing(tmp_path):
    write_hvu(tmp_path)
    s = load_hvu(tmp_path, num_actions=2, min_scene_count=3)
    assert (
        sorted(set(np.concatenate([v.metadata["action"] for v in s.values()])))
        == [
            "cooking",
            "skiing",
        ]
        or len(set(np.concatenate([v.metadata["action"] for v in s.values()]))) == 2
    )
    hi = load_hvu(tmp_path, min_scene_count=30)
    assert not [c for c in hi["train"].metadata if c.startswith("scene=")]
    (tmp_path / "features" / "clip7.npy").unlink()
    with pytest.raises(DataNotFoundError, match=r"features/<clip_id>\.npy.*clip7"):
        load_hvu(tmp_path)
    dropped = load_hvu(tmp_path, on_missing="drop")
    assert sum(len(v) for v in dropped.values()) == 59
    with pytest.raises(ValueError, match=r"no column\(s\) \['scenes'\]"):
        load_hvu(tmp_path, scene_column="scenes")
    (tmp_path / "annotations.csv").unlink()
    with pytest.raises(DataNotFoundError, match=r"annotations\.csv"):
        load_hvu(tmp_path)


def test_hvu_missing_features_and_index(tmp_path):
    write_hvu(tmp_path, layout="matrix")
    (tmp_path / "features_clips.txt").unlink()
    with pytest.raises(DataNotFoundError, match=r"features_clips\.txt"):
        load_hvu(tmp_path)
    (tmp_path / "features.npy").unlink()
    with pytest.raises(DataNotFoundError, match=r"folder .*features .*features\.npy"):
        load_hvu(tmp_path)


# -------------------------------------------------------------------------------- MRI


@needs_nibabel
@pytest.mark.parametrize("path_column", [False, True])
def test_mri_layout(tmp_path, path_column):
    write_mri(tmp_path, path_column=path_column)
    s = load_multisite_mri(tmp_path, volume_shape=(8, 8, 8), normalize=False, seed=2)
    assert sum(len(v) for v in s.values()) == 24
    for sp in s.values():
        assert sp.images.shape[1:] == (1, 8, 8, 8)
        for vol, y, subj, site, age, sex in zip(
            sp.images,
            sp.labels,
            sp.metadata["subject"],
            sp.metadata["site"],
            sp.metadata["age"],
            sp.metadata["sex"],
            strict=True,
        ):
            i = int(subj[4:])
            assert abs(float(vol[0, 4, 4, 4]) - i) < 1e-5  # resampled, value kept
            assert y.item() == i % 2 and site == ["siteA", "siteB", "siteC"][i % 3]
            assert age == 20 + i and sex == ["F", "M"][(i // 2) % 2]
    norm = load_multisite_mri(tmp_path, volume_shape=(8, 8, 8))
    v = norm["train"].images
    torch.testing.assert_close(v.mean(dim=(1, 2, 3, 4)), torch.zeros(len(v)), atol=1e-5, rtol=0)


@needs_nibabel
def test_mri_missing_pieces(tmp_path):
    write_mri(tmp_path, n=12)
    with pytest.raises(ValueError, match=r"participants\.csv has no column\(s\) \['scanner'\]"):
        load_multisite_mri(tmp_path, site_column="scanner")
    (tmp_path / "volumes" / "sub-03.nii.gz").unlink()
    with pytest.raises(DataNotFoundError, match=r"volumes/<subject>\.nii\.gz.*sub-03"):
        load_multisite_mri(tmp_path)
    with pytest.raises(DataNotFoundError, match="participants file not found"):
        load_multisite_mri(tmp_path, participants_file="subjects.csv")


@needs_nibabel
def test_mri_bad_age(tmp_path):
    write_mri(tmp_path, n=6)
    text = (tmp_path / "participants.csv").read_text().replace(",22,", ",n/a,")
    (tmp_path / "participants.csv").write_text(text)
    with pytest.raises(ValueError, match=r"age.*sub-02.*'n/a'"):
        load_multisite_mri(tmp_path)
