import os

import torch

# Without a GPU, Triton kernels run through Triton's interpreter (must be set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Two test workers share two cores: one intra-op thread each (oversubscription makes small convs ~10x slower).
torch.set_num_threads(1)


def pytest_configure(config):
    # Markers of timm's own test-suite (tests/test_timm_suite.py runs it), registered so they raise no warnings.
    for name in ("base", "cfg", "cfg_nonstd", "forward", "backward", "torchscript", "features", "fxforward",
                 "fxbackward", "timeout"):
        config.addinivalue_line("markers", f"{name}: used by timm's test_models.py")


# The tests that exercise Triton kernels: on CPU they run through the interpreter; on a GPU machine
# `python -m pytest -m gpu` runs them compiled (whole models on the Triton path included).
_GPU_FILES = ("test_op_", "test_ops_dispatch.py", "test_models_triton.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name.startswith(_GPU_FILES):
            item.add_marker("gpu")
