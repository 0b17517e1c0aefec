import pytest
import torch
from layouts import needs_pil, write_csv, write_ppb

from metanorm.datasets import DataNotFoundError, load_gs_ppb


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
