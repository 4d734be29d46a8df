"""Per-edit seeding: edit k of a sequence runs with every random generator seeded to seed + k.

Editing methods sample (ROME and MEMIT generate their context templates by sampling from the model), so an edit's
result depends on the random state it starts in. Seeding each edit from its index, not once per run, makes edit k
the same whether the run got there in one go or was resumed from a checkpoint."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's (every device) and numpy's global generators."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed % 2**32)
