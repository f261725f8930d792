import os

import torch

# Without a GPU, Triton kernels run through Triton's interpreter (must be set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Two test workers share two cores: one intra-op thread each (oversubscription makes small convs ~10x slower).
torch.set_num_threads(1)
