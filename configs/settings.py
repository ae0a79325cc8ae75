"""Where pomona keeps its state: one home folder (env `POMONA_HOME`, default `./pomona-runs`).

It holds the content-addressed stage store, Prefect's persisted task results, and the embedded MLflow database and
artifacts. Deleting it starts from scratch; keeping it lets reruns reuse finished stages.
"""

from __future__ import annotations

import os
from pathlib import Path

CODE_VERSION = "pomona-0.1.0/stages-1"
"""Part of every stage key: bump it when a stage writes different output for the same config and inputs."""


def pomona_home() -> Path:
    return Path(os.environ.get("POMONA_HOME", "pomona-runs")).resolve()


def store_root() -> Path:
    return pomona_home() / "store"


def prefect_results_dir() -> Path:
    return pomona_home() / "prefect-results"


def prepare_environment() -> None:
    """Defaults that keep the embedded Prefect quiet and robust on a small machine; explicit env wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
