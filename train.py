"""Train a hub backbone: `python train.py [model=NAME] [data=...] [trainer=...] [key=value ...]` (see conf/)."""
import os

# OpenMP threads that sleep rather than spin while waiting: on a CPU shared with other processes, spinning threads
# make each step many times slower. Must be set before torch loads OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from backbones.training import register_model_configs, run_job, train  # noqa: E402

register_model_configs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf"))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_job(train, cfg)


if __name__ == "__main__":
    main()
