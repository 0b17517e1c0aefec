import numpy as np
import pytest
from layouts import ACTIONS, SCENES, hvu_main_scene, write_hvu

from metanorm.datasets import DataNotFoundError, load_hvu


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
