import numpy as np
import pytest
import torch


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Skips the inductor tests under ``ATEN_CPU_CAPABILITY=default`` (``make portability``).

    With ATen's generic kernels selected, torch 2.13's inductor still emits ``at::vec`` code for
    some reductions and its C++ compile fails ("'at::vec' has not been declared"): a limitation
    of the compiler under that setting, not of the layer. The eager, ``aot_eager`` and export
    tests still run there.
    """
    import os

    if os.environ.get("ATEN_CPU_CAPABILITY") != "default":
        return
    skip = pytest.mark.skip(
        reason="inductor's C++ does not compile under ATEN_CPU_CAPABILITY=default (torch 2.13)"
    )
    for item in items:
        if "inductor" in item.name:
            item.add_marker(skip)
