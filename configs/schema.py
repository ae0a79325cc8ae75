"""Building blocks shared by every stage config.

Every config is strict (unknown keys are errors, so a typo in a recipe fails at load time rather than silently
using a default) and every field carries a description: Prefect renders these models as the flow-run form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


RUNTIME_ONLY = {"pomona_runtime_only": True}
"""`json_schema_extra` of a field that changes where or how fast a stage runs, never what it computes (e.g. the
task runner): content keys leave it out, so switching it reuses finished stages."""


INPUT_FILE = {"pomona_input_file": True}
"""`json_schema_extra` of a field naming a file the run reads: `missing_input_files` checks these before a run
starts, so a typo costs a second, not a Prefect start-up and a stage's traceback."""

REPO_INPUT_DIR = {"pomona_input_file": "repo"}
"""As INPUT_FILE, for a folder or file that a relative path may also name from the repository root (`repo_path`)."""

LM_EVAL_TASK_DIR = {**REPO_INPUT_DIR, "pomona_input_refs": "tasks.evaluate:task_data_fingerprints"}
"""As REPO_INPUT_DIR, for a folder whose files name further inputs (lm-eval task YAMLs name data files anywhere):
`pomona_input_refs` is the function giving those inputs' fingerprints for the cache keys."""

REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_path(path: str) -> Path:
    """A relative path is taken against the current directory when it exists there, else the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO_ROOT / p).resolve()


def local_only_model_name(name: str) -> bool:
    """Whether a model name can only be a local folder: a hub id is `name` or `owner/name`, so a leading `.`, `/`
    or `~`, or a second slash, means a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def missing_input_files(config: BaseModel, where: str = "") -> list[str]:
    """`dotted.field: 'path'` for every input file or folder (INPUT_FILE / REPO_INPUT_DIR fields, local model folders,
at any depth) that does not exist."""
    missing = []
    if isinstance(config, ModelConfig):
        name = config.name_or_path
        if local_only_model_name(name) and not Path(name).expanduser().exists():
            hint = " (run `make smollm2` first)" if "smollm2" in name.lower() else ""
            missing.append(f"{where}name_or_path: {name!r} (a model folder){hint}")
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        here = f"{where}{name}"
        extra = field.json_schema_extra
        kind = extra.get("pomona_input_file") if isinstance(extra, dict) else None
        if kind and value and not (repo_path(value) if kind == "repo" else Path(value).expanduser()).exists():
            missing.append(f"{here}: {value!r}")
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, list):
            items = list(enumerate(value))
        else:
            items = [(None, value)]
        for key, item in items:
            if isinstance(item, BaseModel):
                missing += missing_input_files(item, f"{here}." if key is None else f"{here}.{key}.")
    return missing


def runtime_only(field) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("pomona_runtime_only"))


class StrictModel(BaseModel):
    """Every pomona config: unknown keys are errors (a typo never passes silently), assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def form_defaults(self) -> dict:
        """This config as a Prefect form's pre-filled value (configs that derive fields from others override it)."""
        return self.model_dump(mode="json")


class DataConfig(StrictModel):
    """Where the records come from."""

    path: str = Field(min_length=1, json_schema_extra=INPUT_FILE,
                      description="Alpaca/ShareGPT/messages JSON or JSONL file, a .parquet file, or a saved HF dataset folder.")
    format: Literal["auto", "alpaca", "sharegpt", "messages"] = Field(
        "auto", description="Record format; 'auto' detects it from the first record's fields.")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="'raise' stops at the first bad record; 'skip' writes bad records to rejects.jsonl and counts them.")
    limit: int | None = Field(None, ge=1, description="Keep only the first N valid records (for quick trials).")
    leading_reply: Literal["reject", "drop"] = Field(
        "reject", description="A conversation that opens with an assistant turn (ShareGPT cut long conversations "
        "into parts; each later part opens with a reply): 'reject' refuses it, 'drop' leaves that reply out and keeps "
        "the rest, listing each in the records stage's repairs.jsonl.")


class ModelConfig(StrictModel):
    """A causal LM: a local folder, a hub name (when a hub is reachable), a GGUF file, or a tiny random model."""

    name_or_path: str = Field(
        min_length=1, description="Local folder or hub name; `tiny:<seed>` builds a tiny random Llama with a freshly trained tokenizer.")
    gguf_file: str | None = Field(None, description="GGUF file name inside `name_or_path` to load instead of safetensors.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' = float32 on CPU (the fast dtype there), bfloat16 on CUDA.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' = CUDA when available, else CPU.")
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with the checkpoint. Off unless you trust it.")


def share_count(share: float, n: int) -> int:
    """floor(share x n), refusing a share that keeps nothing of a non-empty pool (the run would end with an empty
    subset and report success)."""
    from configs.errors import ConfigError

    kept = min(n, int(n * share))
    if kept == 0 and n > 0:
        raise ConfigError(f"share {share:g} of {n} samples keeps none: raise the share or give a budget")
    return kept


class Budget(StrictModel):
    """How many samples a selection keeps: a fixed count or a share."""

    budget: int | None = Field(None, ge=1, description="Keep exactly this many samples (fewer if fewer remain).")
    share: float | None = Field(None, gt=0, le=1, description="Keep this share of the samples instead of a fixed count.")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.budget is None) == (self.share is None):
            raise ValueError("give exactly one of 'budget' or 'share'")
        return self

    def count(self, n: int) -> int:
        """The number to keep out of n candidates (a share rounds down, and must keep at least one)."""
        if self.budget is not None:
            return min(self.budget, n)
        return share_count(self.share, n)


class TrackingConfig(StrictModel):
    """Where a run is logged in MLflow."""

    experiment: str | None = Field(None, description="MLflow experiment; defaults to the recipe name.")
    enabled: bool = Field(True, description="Log params, metrics and artifacts to MLflow.")
    ui_url: str | None = Field(
        None, description="Public URL of the MLflow UI that run links point at (e.g. https://mlflow.example.org); "
                          "default: env POMONA_MLFLOW_UI_URL, else MLFLOW_TRACKING_URI when it is an http(s) server. "
                          "The tracking URI itself may name a database with its password and is never shown.")

    @field_validator("ui_url")
    @classmethod
    def _browsable(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("ui_url must be an http:// or https:// address of the MLflow UI")
        return value.rstrip("/") if value else value


def tracking_field():
    """The `tracking` field every run config has."""
    return Field(default_factory=TrackingConfig,
                 description="MLflow experiment (default: the recipe name) and whether to log at all.")


class SelectionFlowBase(StrictModel):
    """What a stand-alone selection flow's config shares: the pool, the subset's format, tracking (and a `name`)."""

    data: DataConfig = Field(description="The candidate pool the method selects from.")
    output_format: Literal["source", "alpaca", "sharegpt", "messages"] = Field(
        "source", description="Format of subset.jsonl: 'source' writes each record as the user's own row.")
    tracking: TrackingConfig = tracking_field()

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name  # type: ignore[attr-defined]
