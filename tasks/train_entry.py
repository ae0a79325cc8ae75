"""Worker entry point for launched training: `torchrun ... -m tasks.train_entry <launch spec JSON>`.

The Prefect task writes a launch spec (kind, data file, model, stage config, output folder) and starts
`torchrun` / `accelerate launch` on this module; every worker trains with `tasks.train.train_in_process`. The
launcher sets RANK / WORLD_SIZE / MASTER_*; MLFLOW_RUN_ID and MLFLOW_TRACKING_URI name the stage's MLflow run,
which the Trainer's MLflow callback logs into from rank 0.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from configs.schema import ModelConfig
from configs.settings import prepare_environment
from configs.train import DPOStageConfig, SFTStageConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="launch spec JSON written by tasks.train.launch_command")
    args = parser.parse_args(argv)
    prepare_environment()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    spec = json.loads(args.spec.read_text())
    config_type = SFTStageConfig if spec["kind"] == "sft" else DPOStageConfig
    from tasks.train import train_in_process

    train_in_process(spec["kind"], Path(spec["data_path"]), ModelConfig.model_validate(spec["model"]),
                     config_type.model_validate(spec["config"]), Path(spec["out_dir"]))


if __name__ == "__main__":
    main()
