# Type stub of the optional compiled CPU kernel built from csrc/low_rank.cpp (see setup.py).
import torch

MAX_COLUMNS: int

def low_rank_residual(
    F: torch.Tensor, A: torch.Tensor, B: torch.Tensor, streaming: bool = True
) -> list[torch.Tensor]: ...
def batch_residual(
    features: torch.Tensor,
    rows: torch.Tensor,
    kernel: torch.Tensor,
    remove_mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, float]: ...
