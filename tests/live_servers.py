"""Real servers for the operations tests: `prefect server start`, `mlflow server`, `pomona serve`.

Each starts as a subprocess on a free 127.0.0.1 port with its own state folder, and `LiveStack.shared()` keeps
one stack for the whole pytest process (the browser test and the rerun test use the same one), stopped at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POSTGRES = ("127.0.0.1", 5432)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_reachable() -> bool:
    try:
        with socket.create_connection(POSTGRES, timeout=1):
            return True
    except OSError:
        return False


def postgres_database(name: str, drop: bool = False) -> str:
    """Create (or drop) a database on the local PostgreSQL; returns its name."""
    import psycopg2

    conn = psycopg2.connect(host=POSTGRES[0], port=POSTGRES[1], user="postgres", dbname="test")
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' if drop else f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return name


def postgres_urls(tag: str) -> tuple[str, str, list[str]]:
    """Fresh Prefect and MLflow databases: (Prefect URL, MLflow URL, database names to drop later)."""
    host, port = POSTGRES
    prefect_db = postgres_database(f"pomona_prefect_{tag}")
    mlflow_db = postgres_database(f"pomona_mlflow_{tag}")
    return (f"postgresql+asyncpg://postgres@{host}:{port}/{prefect_db}",
            f"postgresql+psycopg2://postgres@{host}:{port}/{mlflow_db}", [prefect_db, mlflow_db])


def base_env(**extra: str) -> dict[str, str]:
    from tasks.train import DISTRIBUTED_ENV_VARS

    # an in-process DeepSpeed test earlier in the session leaves LOCAL_RANK & co. in this process's environment:
    # a child must not take itself for a rank of that training
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k not in DISTRIBUTED_ENV_VARS}
    # MLflow's telemetry thread sets and pops an environment variable while requests read the environment:
    # under load a tracking call then fails with KeyError('_MLFLOW_TELEMETRY_SESSION_ID'). Off, as offline anyway.
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
               MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    env.update(extra)  # may override those (a test that reads Prefect's INFO lines)
    return env


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-4000:]}")


def start(cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Interrupt the process group this test started (start_new_session), then SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def start_prefect_server(home: Path, database_url: str | None = None) -> tuple[subprocess.Popen, str, Path]:
    """Launch `prefect server start`; returns (process, API url, log) without waiting for it."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    # The UI asks the server where the API is; the default (port 4200) is wrong on any other port.
    env = base_env(PREFECT_HOME=str(home / "prefect-home"), PREFECT_UI_API_URL=api)
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    log = home / "logs" / "prefect-server.log"
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    return proc, api, log


def start_mlflow_server(home: Path, backend_uri: str | None = None) -> tuple[subprocess.Popen, str, Path]:
    """Launch `mlflow server` (one worker, no job runner) with an artifact folder; returns without waiting."""
    port = free_port()
    backend_uri = backend_uri or f"sqlite:///{home / 'mlflow.db'}"
    log = home / "logs" / "mlflow-server.log"
    env = base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                  "--backend-store-uri", backend_uri, "--artifacts-destination", str(home / "mlartifacts")],
                 env, log, cwd=home)
    return proc, f"http://127.0.0.1:{port}", log


def serving_env(api_url: str, pomona_home: Path, mlflow_url: str | None) -> dict[str, str]:
    env = base_env(PREFECT_API_URL=api_url, POMONA_HOME=str(pomona_home), PREFECT_RUNNER_POLL_FREQUENCY="1",
                   PREFECT_HOME=str(pomona_home / "prefect-client-home"))
    if mlflow_url:
        env["MLFLOW_TRACKING_URI"] = mlflow_url
    return env


_SHARED: "LiveStack | None" = None


def _drain_prefect_workers() -> None:
    """Flush and stop this process's log and event senders: they keep the API URL they started with."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    # drain_all only touches running instances (`instance()` would start one, and an ephemeral API with it).
    APILogWorker.drain_all(at_exit=False)
    EventsWorker.drain_all(at_exit=False)


@contextlib.contextmanager
def prefect_api(url: str) -> Iterator[None]:
    """Point this process's Prefect client at `url` for a while.

    Task runs reach the API as events, sent by one long-lived worker per process that keeps the URL it started
    with; without draining it on the way in and out, runs of other tests (the session's `prefect_server`) would
    be reported to this server, and the other way round.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    _drain_prefect_workers()
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
            _drain_prefect_workers()
    finally:
        _drain_prefect_workers()


@dataclass
class LiveStack:
    """A Prefect server, an MLflow server, and `pomona serve` registered against both."""

    root: Path
    prefect_api: str
    mlflow_url: str
    pomona_home: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    backend: str = "sqlite"
    databases: list[str] = field(default_factory=list)

    @property
    def prefect_ui(self) -> str:
        return self.prefect_api.removesuffix("/api")

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)
        shutil.rmtree(self.root, ignore_errors=True)
        for name in self.databases:
            postgres_database(name, drop=True)

    @classmethod
    def shared(cls) -> "LiveStack":
        """The production backends (PostgreSQL for both servers) when the local PostgreSQL answers, else SQLite.

        `POMONA_TEST_BACKEND=sqlite` forces SQLite.
        """
        global _SHARED
        if _SHARED is None:
            root = Path(tempfile.mkdtemp(prefix="pomona-live-"))
            if os.environ.get("POMONA_TEST_BACKEND", "postgres") == "postgres" and postgres_reachable():
                prefect_db, mlflow_db, names = postgres_urls(root.name.rsplit("-", 1)[-1].lower())
                try:
                    _SHARED = cls.start(root, prefect_db, mlflow_db)
                except BaseException:
                    for name in names:
                        postgres_database(name, drop=True)
                    raise
                _SHARED.backend, _SHARED.databases = "postgres", names
            else:
                _SHARED = cls.start(root)
            atexit.register(_SHARED.close)
        return _SHARED

    @classmethod
    def start(cls, root: Path, prefect_db: str | None = None, mlflow_db: str | None = None) -> "LiveStack":
        procs: list[subprocess.Popen] = []
        try:
            # Both servers boot at once (about 12 s and 8 s alone on an idle machine).
            prefect_proc, api, prefect_log = start_prefect_server(root, prefect_db)
            procs.append(prefect_proc)
            mlflow_proc, mlflow_url, mlflow_log = start_mlflow_server(root, mlflow_db)
            procs.append(mlflow_proc)
            wait_until_up(f"{api}/health", prefect_proc, prefect_log)
            pomona_home = root / "pomona-home"
            serve = start([str(BIN / "pomona"), "serve"], serving_env(api, pomona_home, mlflow_url),
                          root / "logs" / "pomona-serve.log")
            procs.append(serve)
            wait_until_up(f"{mlflow_url}/health", mlflow_proc, mlflow_log)
            stack = cls(root, api, mlflow_url, pomona_home, procs)
            stack.wait_for_deployment("pomona-pipeline/pomona", serve)
            return stack
        except BaseException:
            for proc in reversed(procs):
                stop(proc)
            raise

    # ------------------------------------------------------------------------------------------- API helpers
    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.prefect_api)

    def wait_for_deployment(self, name: str, serve: subprocess.Popen, timeout: float = 120):
        from prefect.exceptions import ObjectNotFound

        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                if serve.poll() is not None:
                    raise RuntimeError(f"pomona serve exited:\n{(self.root / 'logs/pomona-serve.log').read_text()[-4000:]}")
                try:
                    return client.read_deployment_by_name(name)
                except ObjectNotFound:
                    time.sleep(0.5)
        raise TimeoutError(f"deployment {name} was not registered within {timeout} s")

    def run_deployment(self, name: str, parameters: dict, timeout: float = 180):
        """Create a flow run of a served deployment through the API and wait for a final state."""
        with self.client() as client:
            deployment = client.read_deployment_by_name(name)
            run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        return self.wait_final(run.id, timeout)

    def wait_final(self, flow_run_id, timeout: float = 180):
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                run = client.read_flow_run(flow_run_id)
                if run.state is not None and run.state.is_final():
                    return run
                time.sleep(0.5)
        raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout} s; last state {run.state}:\n"
                           f"{(self.root / 'logs/pomona-serve.log').read_text()[-4000:]}")

    def retry(self, flow_run_id, timeout: float = 180):
        """What the UI's Retry button does: put the finished run back to Scheduled/AwaitingRetry."""
        from prefect.states import AwaitingRetry

        with self.client() as client:
            client.set_flow_run_state(flow_run_id, AwaitingRetry(message="Retry from the test"), force=True)
        time.sleep(1)
        return self.wait_final(flow_run_id, timeout)

    def task_states(self, flow_run_id) -> dict[str, list[str]]:
        """Task name -> the states of its task runs in this flow run (oldest first)."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from prefect.client.schemas.sorting import TaskRunSort

        with self.client() as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                         sort=TaskRunSort.EXPECTED_START_TIME_ASC)
        out: dict[str, list[str]] = {}
        for r in runs:
            out.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
        return out


# ------------------------------------------------------------------------------------ the rerun scenario
DEPLOYMENT = "pomona-pipeline/pomona"
FAIL_STAGE = "select-baseline"
EXPERIMENT = "operations-test"


def scenario_recipe(**overrides):
    """The demo recipe on 150 bundled records, selection only (training and evaluation have their own tests;
    here they would only multiply the time of each of the four runs)."""
    from configs.pipeline import load_recipe

    return load_recipe(REPO / "configs/recipes/demo.yaml",
                       overrides={"data.path": str(REPO / "tests/data/alpaca_demo_200.json"), "data.limit": 150,
                                  "selection.budget": 23, "tracking.experiment": EXPERIMENT, "train": None,
                                  "evaluate": None, **overrides})


def file_stamps(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class RerunScenario:
    stack: LiveStack
    reference: dict  # stage name -> StageOutput of the uninterrupted in-process run
    failed: object  # the flow run after its first (failed) attempt
    after_failure: dict
    retried: object  # the same flow run after the Retry
    after_retry: dict
    rerun: object  # a new flow run with the same parameters


_SCENARIO: RerunScenario | None = None


def rerun_scenario() -> RerunScenario:
    """Uninterrupted reference run in-process (its own store), then fail -> Retry -> rerun on the served stack.

    Run once per pytest process; the rerun test asserts on it and the browser test photographs it.
    """
    global _SCENARIO
    if _SCENARIO is not None:
        return _SCENARIO
    from flows.pipeline import pipeline

    stack = LiveStack.shared()
    config = scenario_recipe()
    with prefect_api(stack.prefect_api):
        # This process's POMONA_HOME: nothing shared with the served store. Tracking is in no stage key; off
        # here, it saves setting up the embedded MLflow database.
        reference = pipeline(scenario_recipe(**{"tracking.enabled": False}))
    store = stack.pomona_home / "store"
    records_dir = store / reference["records"].stage / reference["records"].key
    params = {"config": config.model_dump(mode="json")}
    failed = stack.run_deployment(DEPLOYMENT, {**params, "fail_at": FAIL_STAGE})
    after_failure = {"states": stack.task_states(failed.id), "state": failed.state,
                     "records": file_stamps(records_dir),
                     "select_dir_exists": (store / reference["selection"].stage / reference["selection"].key).exists()}
    retried = stack.retry(failed.id)
    after_retry = {"states": stack.task_states(retried.id), "records": file_stamps(records_dir)}
    rerun = stack.run_deployment(DEPLOYMENT, params)
    _SCENARIO = RerunScenario(stack, reference, failed, after_failure, retried, after_retry, rerun)
    return _SCENARIO
