import os

import torch

# Without a GPU, Triton kernels run through Triton's interpreter (must be set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
