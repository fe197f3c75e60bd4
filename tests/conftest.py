import os

import pytest
import torch

# Tests never touch the network: W&B, if imported at all, runs offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _single_thread():
    """Keep timing-insensitive tests deterministic and light on the 2-core CI machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
