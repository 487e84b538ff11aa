import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    """Every test starts from the same RNG state, so results never depend on test order."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
