"""RunIf-style skip markers."""

import pytest
import torch


def run_if(min_cuda_gpus: int = 0) -> pytest.MarkDecorator:
    """Skip unless the machine has at least ``min_cuda_gpus`` CUDA devices."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(have < min_cuda_gpus, reason=f"needs {min_cuda_gpus} CUDA GPU(s), found {have}")
