"""MLflow tracking: one experiment per recipe, a parent run per pipeline run, a child run per stage.

Plain functions over `MlflowClient` (explicit run ids, so they work from any Prefect worker thread), and thin
tasks that the flows call. The embedded default is SQLite in POMONA_HOME with an explicit artifact folder
(MLflow 3.13+ refuses `file:` stores); `MLFLOW_TRACKING_URI` points it at a server instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.redact import redact_url, redact_values, strip_userinfo
from configs.settings import pomona_home
from tasks.store import KEY_FILE, MANIFEST, StageOutput, content_digest

MAX_PARAM_CHARS = 6000
CONFIG_HASH_TAG = "pomona.config_hash"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{pomona_home() / 'mlflow.db'}"


def client():
    from mlflow import MlflowClient

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it with an explicit artifact location when the store is a local database."""
    mlc = client()
    found = mlc.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if not tracking_uri().startswith(("http://", "https://", "databricks")):
        location = (pomona_home() / "mlartifacts" / name).as_uri()
    return mlc.create_experiment(name, artifact_location=location)


def flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}, as MLflow params."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    # URLs lose user:password and secret query values (an endpoint's base_url): params are shown to everyone
    value = json.dumps(redact_values(obj)) if isinstance(obj, list) else redact_url(str(obj))
    out[sanitize_metric_key(prefix.rstrip("."))] = param_value(value)
    return out


TRUNCATED = " ...[truncated: the whole value is in config.yaml / stage_key.json]"


def param_value(value: str) -> str:
    """A value MLflow takes as a param (at most MAX_PARAM_CHARS), cut visibly: a silently cut JSON list reads as
    valid-looking garbage. The run's config.yaml (parent) or stage_key.json (stage) holds it whole."""
    return value if len(value) <= MAX_PARAM_CHARS else value[:MAX_PARAM_CHARS - len(TRUNCATED)] + TRUNCATED


def sanitize_metric_key(key: str) -> str:
    """MLflow accepts only alphanumerics and `_ - . space : /` in metric and param keys (lm-eval's `acc,none` is
    refused, and so would be a user's generator label key `gpt-4 (0613)`)."""
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)


def git_commit() -> str:
    """The code's commit: $POMONA_GIT_COMMIT where set (the docker images, built without .git), else git's."""
    if os.environ.get("POMONA_GIT_COMMIT"):
        return os.environ["POMONA_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def start_parent_run(experiment: str, run_name: str, config: Any, flow_run_id: str | None) -> str:
    """Open the pipeline's parent run, log the whole config (flattened params + the recipe YAML) and tags."""
    from mlflow.entities import Param

    mlc = client()
    exp_id = ensure_experiment(experiment)
    tags = {CONFIG_HASH_TAG: content_digest(config)[:16], "pomona.git_commit": git_commit(),
            "prefect.flow_run_id": flow_run_id or "none"}
    ui_url = getattr(getattr(config, "tracking", None), "ui_url", None)
    if ui_url:  # stage runs copy it, so every link of this run points at the UI the recipe named
        tags[UI_URL_TAG] = ui_url
    tags.update(process_tags())
    end_runs_of_dead_processes(exp_id)
    reap_orphan_prefect_servers()
    run = mlc.create_run(exp_id, run_name=run_name, tags=tags)
    with failed_if_raises(run.info.run_id):
        params = [Param(k, v) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):
            mlc.log_batch(run.info.run_id, params=params[i:i + 100])
        mlc.log_text(run.info.run_id, yaml.safe_dump(redact_values(config.model_dump(mode="json")), sort_keys=False),
                     "config.yaml")
    return run.info.run_id


HOST_TAG, PID_TAG = "pomona.host", "pomona.pid"
ENDED_BY_TAG = "pomona.ended_by"


def process_tags() -> dict[str, str]:
    """Which process on which machine holds a run open: how a later run tells one still running from one whose
    process was killed (kill -9, the OOM killer, a lost machine), which can never end its own runs."""
    import socket

    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


PREFECT_SERVER_APP = "prefect.server.api.server:create_app"


def processes_with_env(name: str, cmdline_has: str | None = None, proc: Path = Path("/proc")) -> dict[int, str]:
    """{pid: value of `name`} of this machine's processes, this one aside, whose environment sets `name` and whose
    command line contains `cmdline_has` (when given: read first, it is cheaper than the environment). Processes gone
    meanwhile and other users' are skipped. Without /proc (not Linux) there is nothing to read: {}."""
    found: dict[int, str] = {}
    if not proc.is_dir():
        return found
    marker = f"{name}=".encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if cmdline_has is not None and cmdline_has.encode() not in (entry / "cmdline").read_bytes():
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or another user's process
            continue
        value = next((v[len(marker):] for v in environ if v.startswith(marker)), None)
        if value is not None:
            found[int(entry.name)] = value.decode(errors="replace")
    return found


def pomona_prefect_servers(proc: Path = Path("/proc")) -> dict[int, int]:
    """{server pid: owner pid} of the temporary Prefect servers pomona processes of this machine started: the
    command line serves Prefect's app and the environment carries `POMONA_OWNER_PID` (set by
    `prepare_environment`, inherited by the server)."""
    from configs.settings import OWNER_PID_ENV

    return {pid: int(owner) for pid, owner in processes_with_env(OWNER_PID_ENV, PREFECT_SERVER_APP, proc).items()
            if owner.isdigit()}


def reap_orphan_prefect_servers(proc: Path = Path("/proc")) -> list[int]:
    """Stop the temporary Prefect servers that pomona processes of this machine started and left behind when they
    were killed (kill -9 skips Prefect's exit hook; each server holds ~220 MB and a port forever): those of
    `pomona_prefect_servers` whose owner pid is gone. Returns the pids stopped."""
    import signal

    stopped = []
    for pid, owner in pomona_prefect_servers(proc).items():
        if process_alive(owner):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            continue
        stopped.append(pid)
    if stopped:
        warnings.warn(f"stopped {len(stopped)} temporary Prefect server(s) (pids {', '.join(map(str, stopped))}) left "
                      "running by pomona processes that were killed", stacklevel=2)
    return stopped


def detach_temporary_prefect_server() -> None:
    """Start the temporary Prefect server (the one Prefect starts when no `PREFECT_API_URL` is set) in a session of
    its own. In the terminal's process group Ctrl-C stopped it together with this process, whose crash handling then
    spent minutes retrying the vanished API (the flow run left Running, no exit) instead of marking the run Crashed
    and exiting at once. Detached, the server outlives the interrupt and Prefect's exit hook stops it; if this
    process is killed outright, the next run stops it (`reap_orphan_prefect_servers`). Idempotent."""
    import functools
    import types

    from prefect.server.api import server as prefect_server

    launch = prefect_server.SubprocessASGIServer._run_uvicorn_command
    if getattr(launch, "pomona_detached", False):
        return

    def detached_launch(self):
        # Prefect's own command line and environment, only its Popen gets start_new_session (setsid in the child)
        module_subprocess = prefect_server.subprocess
        prefect_server.subprocess = types.SimpleNamespace(
            Popen=functools.partial(module_subprocess.Popen, start_new_session=True))
        try:
            return launch(self)
        finally:
            prefect_server.subprocess = module_subprocess

    detached_launch.pomona_detached = True  # type: ignore[attr-defined]
    prefect_server.SubprocessASGIServer._run_uvicorn_command = detached_launch


def end_runs_of_dead_processes(experiment_id: str) -> list[str]:
    """Mark KILLED the runs of this experiment left RUNNING by a pomona process of this machine that is gone, and
    their Prefect flow runs Crashed; returns their ids. Without this a killed pipeline stays "Running" in the MLflow
    UI (and in Prefect's) forever, beside the rerun that resumed its shards and finished. Runs of other machines
    and of live processes are left alone (a reused pid reads as alive: the run then stays as it was)."""
    import socket

    mlc = client()
    host = socket.gethostname()
    stale = mlc.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
                            max_results=1000)
    ended = []
    for run in stale:
        pid = run.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or process_alive(int(pid)):
            continue
        mlc.set_tag(run.info.run_id, ENDED_BY_TAG, f"its process {pid} on {host} was gone when a later run started "
                                                   "(killed); that run resumed from the stage store")
        mlc.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
        flow_run_id = run.data.tags.get("prefect.flow_run_id", "none")
        if "mlflow.parentRunId" not in run.data.tags and flow_run_id != "none":
            crash_flow_run(flow_run_id, f"its process {pid} on {host} was killed")
    return ended


def crash_flow_run(flow_run_id: str, why: str) -> None:
    """Set a Prefect flow run still shown as Running to Crashed (no-op when it has ended or is unknown here)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    with get_client(sync_client=True) as prefect:
        try:
            flow_run = prefect.read_flow_run(flow_run_id)
        except ObjectNotFound:  # another Prefect server's run
            return
        if flow_run.state is not None and flow_run.state.is_running():
            prefect.set_flow_run_state(flow_run_id, Crashed(message=f"pomona: {why}"), force=True)


ERROR_TAG = "pomona.error"


def ended_by(exc: BaseException) -> tuple[str, str]:
    """(MLflow status, reason) of a run that `exc` ended: FAILED for an error; KILLED for an interrupt - Ctrl-C,
    SIGTERM, a flow run cancelled in the Prefect UI (Prefect's TerminationSignal), a comparison branch interrupted
    with its flow - none of which is an `Exception`, so that a user can tell a stopped run from a broken one."""
    if isinstance(exc, Exception):
        return "FAILED", f"{type(exc).__name__}: {exc}"[:5000]
    return "KILLED", f"interrupted ({type(exc).__name__}: Ctrl-C, SIGTERM or a cancelled flow run)"


def end_run_by(run_id: str, exc: BaseException) -> None:
    """End `run_id` as `exc` ended it (`ended_by`), its reason in the `pomona.error` tag."""
    status, reason = ended_by(exc)
    mlc = client()
    mlc.set_tag(run_id, ERROR_TAG, reason)
    mlc.set_terminated(run_id, status)


@contextlib.contextmanager
def failed_if_raises(run_id: str) -> Iterator[None]:
    """A run whose logging fails half-way ends FAILED (KILLED when interrupted), not RUNNING forever in the MLflow
    UI."""
    try:
        yield
    except BaseException as exc:
        end_run_by(run_id, exc)
        raise


def tracked_run_or_none(run_id: str):
    """The MLflow run, or None when this tracking store has no such run (the stage was finished by a run logged to
    another MLflow: a deleted mlflow.db, a switch to the compose server)."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def child_tags(parent) -> dict[str, str]:
    """Tags every child run takes from its parent run: the nesting, the Prefect flow run, the recipe's config hash
    and the MLflow UI the recipe named (so the child's links point there too); and the process that logs it
    (`process_tags`). The hash passes through a comparison's `method:<label>` runs to the stage runs nested under
    them, which otherwise got an empty `pomona.config_hash` and fell out of a search by it."""
    tags = {"mlflow.parentRunId": parent.info.run_id,
            "prefect.flow_run_id": parent.data.tags.get("prefect.flow_run_id", "none"), **process_tags()}
    for key in (UI_URL_TAG, CONFIG_HASH_TAG):
        if key in parent.data.tags:
            tags[key] = parent.data.tags[key]
    return tags


def log_stage_run(parent_run_id: str, out: StageOutput, config: Any = None, cached: bool = False,
                  extra_tags: dict[str, str] | None = None, run_id: str | None = None) -> str:
    """A child run for one stage: its config as params, metrics, artifacts and dataset inputs.

    `run_id` logs into a child run the stage opened itself (training opens one first, so the Trainer's curves
    land in it) instead of creating one.
    """
    mlc = client()
    parent = mlc.get_run(parent_run_id)
    tags = {**child_tags(parent), "pomona.stage": out.stage, "pomona.stage_key": out.key,
            "pomona.output_digest": out.digest, "pomona.cached": str(cached).lower(),
            CONFIG_HASH_TAG: parent.data.tags.get(CONFIG_HASH_TAG, "")}
    tags.update(extra_tags or {})
    if run_id is None:
        run_id = mlc.create_run(parent.info.experiment_id, run_name=out.stage, tags=tags).info.run_id
        tags = {}
    with failed_if_raises(run_id):
        for key, value in tags.items():
            mlc.set_tag(run_id, key, value)
        holder = artifacts_holder(mlc, parent.info.experiment_id, out) if cached else None
        if holder is not None:
            mlc.set_tag(run_id, ARTIFACTS_RUN_TAG, holder)
        log_stage_contents(mlc, parent_run_id, run_id, out, config, stage_files=holder is None)
    mlc.set_terminated(run_id, "FINISHED")
    return run_id


ARTIFACTS_RUN_TAG = "pomona.artifacts_run_id"


def artifacts_holder(mlc, experiment_id: str, out: StageOutput) -> str | None:
    """The run of this experiment that computed `out` (same stage key and output digest, not cached) and so holds
    its files as artifacts already, or None. A reused stage's run then points at it instead of copying every file
    again: each rerun of a finished pipeline used to store another full copy of every stage's scores, rankings and
    subsets (a 12k-record Superfiltering run: 6.5 MB per rerun; grows with the data, and is uploaded to a remote
    tracking server)."""
    found = mlc.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time ASC"], filter_string=(
        f"tags.`pomona.stage_key` = '{out.key}' and tags.`pomona.output_digest` = '{out.digest}' and "
        "tags.`pomona.cached` = 'false' and attributes.status = 'FINISHED'"))
    return found[0].info.run_id if found else None


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    """`metrics` on a run, keys made MLflow-safe, in batches (MLflow takes at most 1,000 per call)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(sanitize_metric_key(k), float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(batch), 500):
        client().log_batch(run_id, metrics=batch[i:i + 500])


def log_stage_contents(mlc, parent_run_id: str, run_id: str, out: StageOutput, config: Any,
                       stage_files: bool = True) -> None:
    """Params, metrics, artifacts (with the stage key and the shard manifests) and dataset inputs of one stage.

    `stage_files=False` (a reused stage whose files an earlier run holds, tagged `pomona.artifacts_run_id`) logs
    the stage key only of the files."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag, Param

    params = {**(flatten(config) if config is not None else {}),
              **{sanitize_metric_key(k): param_value(redact_url(str(v))) for k, v in out.params.items()}}
    plist = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(plist), 100):
        mlc.log_batch(run_id, params=plist[i:i + 100])
    timing = {"stage_seconds": out.seconds} if out.seconds is not None else {}
    log_metrics(run_id, {**out.metrics, **timing})
    manifests = [str(p.relative_to(out.path)) for p in sorted(Path(out.path).rglob(f"*{MANIFEST}"))]
    for rel in [KEY_FILE, *manifests, *out.artifacts] if stage_files else [KEY_FILE]:
        path = out.file(rel)
        if path.is_dir():
            mlc.log_artifacts(run_id, str(path), artifact_path=rel)
        elif path.exists():
            mlc.log_artifact(run_id, str(path), artifact_path=str(Path(rel).parent) if Path(rel).parent != Path(".") else None)
    inputs = []
    for ds in out.datasets:
        frame = dataset_frame(out.file(ds["file"]))
        with warnings.catch_warnings():
            # mlflow registers its local-file source class twice and warns on every path; the source is a local file.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            dataset = mlflow.data.from_pandas(frame, source=str(out.file(ds["file"])), name=ds["name"],
                                              digest=ds.get("digest") or out.digest[:16])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(),
                                   tags=[InputTag("mlflow.data.context", ds.get("context", "selection"))]))
    if inputs:
        mlc.log_inputs(run_id, datasets=inputs)
        mlc.log_inputs(parent_run_id, datasets=inputs)


def dataset_frame(path: Path):
    """A JSONL file as a DataFrame with nested values as JSON strings (what MLflow's dataset schema can hold)."""
    import pandas as pd

    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                rows.append({k: v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v, ensure_ascii=False)
                             for k, v in row.items()})
    return pd.DataFrame(rows)


UI_URL_TAG = "pomona.mlflow_ui_url"


def mlflow_ui_url(configured: str | None = None) -> str | None:
    """Where a browser finds the MLflow UI: the recipe's `tracking.ui_url`, else $POMONA_MLFLOW_UI_URL, else the
    tracking URI when it is an http(s) server (without any user:password in it); None for a database store."""
    url = configured or os.environ.get("POMONA_MLFLOW_UI_URL")
    if not url:
        uri = tracking_uri()
        url = uri if uri.startswith(("http://", "https://")) else None
    return strip_userinfo(url).rstrip("/") if url else None


# MLflow 3's UI opens in its GenAI mode, where a run page's breadcrumb leads to "Evaluation runs" (every stage shown
# as an "Eval") and the experiment to a traces overview; this query puts it in "Model training" mode, whose breadcrumb
# leads to the runs table. Older UIs ignore it.
UI_MODE_QUERY = "?workflowType=machine_learning"


def run_link(run_id: str) -> str:
    """A link to the run in the MLflow UI; without a browsable UI, the run id and the store with its credentials
    masked (a `postgresql://user:password@host/db` URI must never reach a log or an artifact)."""
    run = client().get_run(run_id)
    base = mlflow_ui_url(run.data.tags.get(UI_URL_TAG))
    if base:
        return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}{UI_MODE_QUERY}"
    return f"run {run_id} in {redact_url(tracking_uri())}"


def selection_preview(out: StageOutput, rows: int = 5, width: int = 80) -> str:
    """A markdown table of the first selected samples of a selection stage ('' for other stages)."""
    path = Path(out.path) / "subset.messages.jsonl"
    if not path.exists():
        return ""

    def cell(text: str) -> str:
        text = " ".join(text.split()).replace("|", "\\|")
        return text if len(text) <= width else text[:width - 1] + "…"

    lines = [f"First {rows} selected samples (input order):", "", "| # | instruction | response |", "|---|---|---|"]
    with path.open(encoding="utf-8") as handle:
        for n, line in enumerate(handle):
            if n == rows:
                break
            messages = json.loads(line)["messages"]
            user = next((m["content"] for m in messages if m["role"] == "user"), "")
            reply = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")
            lines.append(f"| {n + 1} | {cell(user)} | {cell(reply)} |")
    return "\n".join(lines) + "\n\n"


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only (a generator named `smollm2-1.7b`
    would otherwise fail its stage's summary after the work is done)."""
    key = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(part for part in key.split("-") if part)


# -------------------------------------------------------------------------------------------------- tasks
@task(cache_policy=NO_CACHE, name="start-tracking")
def start_tracking(experiment: str, run_name: str, config: Any) -> str:
    from prefect.runtime import flow_run

    return start_parent_run(experiment, run_name, config, flow_run.get_id())


@task(cache_policy=NO_CACHE, name="log-stage")
def log_stage(parent_run_id: str, out: StageOutput, config: Any = None, cached: bool = False,
              run_id: str | None = None) -> str:
    """Log a stage to MLflow and publish its summary as a Prefect artifact (with the MLflow link)."""
    from prefect.artifacts import create_markdown_artifact

    run_id = log_stage_run(parent_run_id, out, config, cached, run_id=run_id)
    note = " (reused: cached)" if cached else ""
    holder = client().get_run(run_id).data.tags.get(ARTIFACTS_RUN_TAG)
    if holder:
        note += f"; its files are in the run that computed it: {run_link(holder)}"
    create_markdown_artifact(
        key=artifact_key(f"{out.stage}-summary"),
        markdown=f"## {out.stage}{note}\n\n{out.summary}\n\n{selection_preview(out)}MLflow: {run_link(run_id)}"
                 f"\n\nOutput: `{out.path}`",
        description=f"{out.stage} summary")
    return run_id


@task(cache_policy=NO_CACHE, name="log-run-metrics")
def log_run_metrics(run_id: str, metrics: dict[str, float]) -> None:
    log_metrics(run_id, metrics)


@task(cache_policy=NO_CACHE, name="finish-tracking")
def finish_tracking(run_id: str) -> None:
    client().set_terminated(run_id, "FINISHED")


@contextlib.contextmanager
def tracked_run(config: Any) -> Iterator[str | None]:
    """Inside a flow: the MLflow parent run of `config` (None with tracking off), ended FINISHED, or FAILED / KILLED
    with the reason (`end_run_by`)."""
    parent = start_tracking(config.experiment, config.name, config) if config.tracking.enabled else None
    try:
        yield parent
    except BaseException as exc:
        if parent:
            end_run_by(parent, exc)
        raise
    if parent:
        finish_tracking(parent)
