"""Where pomona keeps its state: one home folder (env `POMONA_HOME`, default `./pomona-runs`).

It holds the content-addressed stage store, Prefect's persisted task results, and the embedded MLflow database and
artifacts. Deleting it starts from scratch; keeping it lets reruns reuse finished stages.
"""

from __future__ import annotations

import os
from pathlib import Path

SOURCE_PACKAGES = ("configs", "models", "tasks")
"""The packages whose code computes stage outputs (flows only wire stages: what they pass is in the keys)."""
SOURCE_FILES = ("configs/deepspeed/*.json", "configs/accelerate/*.yaml")
"""Files that are not Python but are stage code all the same: a training config names its DeepSpeed stage
('zero2'), and these files say what that means (an edit changes the trained model, not the stage's key)."""
LIBRARIES = ("torch", "transformers", "tokenizers", "trl", "peft", "lm_eval")
"""Libraries whose upgrade can change a stage's numbers."""


def source_digest(root: Path, packages: tuple[str, ...] = SOURCE_PACKAGES) -> str:
    """sha256 over the relative paths and bytes of every .py file in `packages` under `root`, and of SOURCE_FILES."""
    import hashlib

    h = hashlib.sha256()
    files = [path for package in packages for path in sorted((root / package).rglob("*.py"))]
    files += [path for pattern in SOURCE_FILES for path in sorted(root.glob(pattern))]
    for path in files:
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def code_version() -> str:
    """Part of every stage key: a digest of pomona's own stage code plus the versions of the libraries that compute
    with it. Any edit to that code or a library upgrade starts new stage folders, so a store never hands back
    output that the code as it is now would compute differently (a hand-bumped constant was never bumped)."""
    from importlib import metadata

    versions = []
    for name in LIBRARIES:
        try:
            versions.append(f"{name}={release(metadata.version(name.replace('_', '-')))}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name}=none")
    return f"src-{source_digest(Path(__file__).resolve().parents[1])[:16]};" + ";".join(versions)


def release(version: str) -> str:
    """A version without its local build label: torch 2.13.0+cpu in the CPU image and 2.13.0+cu128 in the CUDA
    image are one release, so workers of both kinds sharing a store reuse each other's stages."""
    return version.split("+", 1)[0]


CODE_VERSION = code_version()


def pomona_home() -> Path:
    return Path(os.environ.get("POMONA_HOME", "pomona-runs")).resolve()


def store_root() -> Path:
    return pomona_home() / "store"


def prefect_results_dir() -> Path:
    return pomona_home() / "prefect-results"


OWNER_PID_ENV = "POMONA_OWNER_PID"
"""Set to this process's pid, so the temporary Prefect server it starts (which inherits the environment) can be
told apart as ours and found again when this process was killed without stopping it (`reap_orphan_prefect_servers`)."""


def prepare_environment() -> None:
    """Defaults that keep the embedded Prefect quiet and robust on a small machine; explicit env wins."""
    os.environ[OWNER_PID_ENV] = str(os.getpid())  # not setdefault: a pomona started by pomona marks its own server
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
