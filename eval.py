"""Evaluate a hub backbone: `python eval.py model=NAME ckpt=PATH|pretrained=true [data=...] [export_dir=DIR]`."""
import os

# OpenMP threads that sleep rather than spin while waiting: on a CPU shared with other processes, spinning threads
# make each step many times slower. Must be set before torch loads OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from backbones.training import evaluate, register_model_configs, run_job  # noqa: E402

register_model_configs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"))


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_job(evaluate, cfg)


if __name__ == "__main__":
    main()
