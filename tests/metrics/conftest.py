import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The metric tests use small tiles; on a busy 2-core machine, intra-op threads waiting for
    # each other make each small op ~100x slower. One thread keeps these tests fast.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
