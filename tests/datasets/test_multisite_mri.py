import pytest
import torch
from layouts import needs_nibabel, write_mri

from metanorm.datasets import DataNotFoundError, load_multisite_mri


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
