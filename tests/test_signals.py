"""How `pomona run` ends on a signal other than Ctrl-C: SIGTERM is what `docker stop`, Kubernetes, systemd and a plain
`kill PID` send, and a process that dies of it without its exit hooks leaves its temporary Prefect server and its
MLflow run behind. And how a run served by `pomona serve` ends when the UI cancels it: the runner SIGTERMs the flow
run's process and SIGKILLs it 30 s later."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.live_servers import base_env

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir() or not hasattr(os, "mkfifo"),
                                reason="reads /proc and a named pipe (Linux)")


def open_writer_once_read(fifo: Path, proc: subprocess.Popen, log: Path, timeout: float = 240) -> int:
    """Wait until `proc` has `fifo` open for reading (its flow is inside the records stage), then hold the writing
    end open without writing: the stage stays blocked on its read until a signal interrupts it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pomona exited with {proc.returncode} before it read its data:\n"
                                 f"{log.read_text()[-4000:]}")
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no process has it open for reading
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        time.sleep(0.1)
    raise AssertionError(f"pomona did not read its data within {timeout} s:\n{log.read_text()[-4000:]}")


def prefect_servers_of(owner: int) -> list[int]:
    """Pids of the temporary Prefect servers that process `owner` started (as `reap_orphan_prefect_servers` finds
    them)."""
    from tasks.track import pomona_prefect_servers

    return [pid for pid, started_by in pomona_prefect_servers().items() if started_by == owner]


def mlflow_runs(home: Path) -> dict[str, tuple[str, str]]:
    """{run name: (status, pomona.error tag)} of the home's MLflow store (the last run of a name wins)."""
    with sqlite3.connect(home / "mlflow.db") as db:
        rows = db.execute("SELECT r.name, r.status, t.value FROM runs r LEFT JOIN tags t "
                          "ON t.run_uuid = r.run_uuid AND t.key = 'pomona.error' ORDER BY r.start_time").fetchall()
    return {name: (status, reason or "") for name, status, reason in rows}


def assert_stopped_not_failed(runs: dict[str, tuple[str, str]], names: set[str]) -> None:
    """No run left RUNNING; the runs the interrupt ended (`names`) KILLED, saying so, not FAILED like a broken one."""
    assert names <= set(runs), runs
    assert all(status != "RUNNING" for status, _ in runs.values()), runs
    for name in names:
        status, reason = runs[name]
        assert status == "KILLED" and reason.startswith("interrupted ("), (name, runs[name])


@contextlib.contextmanager
def pipeline_inside_a_stage(tmp_path: Path, name: str, **env: str) -> Iterator[tuple[subprocess.Popen, Path, Path]]:
    """`pomona run` of a pipeline whose data is a named pipe that never gets data: yields (process, home, log) once
    its records stage waits on it, as deterministic as a slow stage can be. Whatever the test left running (pomona,
    its temporary Prefect server) is killed after it, so that a failed test does not leave it to the rest of the
    suite."""
    fifo = tmp_path / "pool.jsonl"
    os.mkfifo(fifo)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: {name}\ndata: {{path: {fifo}, format: alpaca}}\n"
                      "selection: {method: random, budget: 1}\n")
    home, log = tmp_path / "home", tmp_path / "pomona.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(home), "run", str(recipe)],
                                cwd=REPO, env=base_env(**env), stdout=sink, stderr=subprocess.STDOUT)
    writer = None
    try:
        writer = open_writer_once_read(fifo, proc, log)
        yield proc, home, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if writer is not None:
            os.close(writer)
        for pid in prefect_servers_of(proc.pid):
            os.kill(pid, signal.SIGKILL)


def exit_status(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pomona did not exit within {timeout} s of SIGTERM:\n{log.read_text()[-4000:]}") from None


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path):
    """SIGTERM to the pomona process alone, while its flow is inside a stage: it exits 143 (128 + SIGTERM) within
    seconds, its flow run Crashed, its MLflow run ended, its temporary Prefect server stopped. Python's default action
    (what Prefect's own SIGTERM handler hands the signal back to once it has marked the flow run) killed it on the
    spot, status -15 and no exit hooks: the server stayed until the next run reaped it."""
    with pipeline_inside_a_stage(tmp_path, "sigterm") as (proc, home, log):
        os.kill(proc.pid, signal.SIGTERM)  # the process only, not its group: as `kill PID` and `docker stop` do
        code = exit_status(proc, log, timeout=60)
        left = prefect_servers_of(proc.pid)

    output = log.read_text()
    assert code == 128 + signal.SIGTERM, f"exit status {code}:\n{output[-4000:]}"
    assert any("Flow run" in line and "Crash detected" in line for line in output.splitlines()), \
        output[-4000:]  # Prefect marked the flow run Crashed
    assert left == [], f"its temporary Prefect server (pids {left}) is still running"
    assert_stopped_not_failed(mlflow_runs(home), {"sigterm"})


# Loaded by every Python process of the run (PYTHONPATH), acts in the temporary Prefect server only (Prefect marks its
# environment): once uvicorn has shut down on SIGTERM it re-raises the signal to the handler it found, this one, and the
# server takes 30 s more to exit, as one slow to stop would. Prefect's exit hook then waits its whole 5 s for it, then
# SIGKILLs it: a window a second signal hits for sure, not the fraction of a second an idle server takes to stop.
SERVER_STOPS_SLOWLY = """import os, signal, time
if os.environ.get("PREFECT__SERVER_EPHEMERAL") == "1":
    signal.signal(signal.SIGTERM, lambda signum, frame: time.sleep(30))
"""


def test_a_second_sigterm_during_shutdown_still_stops_the_server(tmp_path):
    """SIGTERM, then another while pomona's exit hook waits for its temporary Prefect server to stop (a supervisor
    that repeats it, `docker stop` then a user's `kill`): pomona still exits 143 and its server is stopped. The
    second signal raised SystemExit inside Prefect's exit hook, which gave up the wait and the SIGKILL after it: the
    server, still stopping, outlived pomona, holding its memory and port until the next run reaped it."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SERVER_STOPS_SLOWLY)
    with pipeline_inside_a_stage(tmp_path, "sigterm-twice", PYTHONPATH=str(hook),
                                 PREFECT_LOGGING_LEVEL="INFO") as (proc, home, log):
        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "Stopping temporary server" not in log.read_text():  # Prefect's exit hook has begun
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"pomona did not begin to stop its server (status {proc.poll()}):\n{log.read_text()[-4000:]}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        code = exit_status(proc, log, timeout=30)
        left = prefect_servers_of(proc.pid)

    output = log.read_text()
    assert code == 128 + signal.SIGTERM, f"exit status {code}:\n{output[-4000:]}"
    assert left == [], f"its temporary Prefect server (pids {left}) is still running:\n{output[-4000:]}"
    assert_stopped_not_failed(mlflow_runs(home), {"sigterm-twice"})


def trickle(fd: int, stop: threading.Event) -> None:
    """Write blank lines into a pipe until `stop` or its reader is gone: a JSONL reader that skips blank lines
    stays busy on them, in Python (interruptible), for as long as the test wants, like a branch that trains."""
    while not stop.is_set():
        try:
            os.write(fd, b"\n" * 64)
        except BlockingIOError:  # the pipe is full: its reader is not reading just now
            pass
        except OSError:  # EPIPE: the reader closed it (the process ended)
            return
        time.sleep(0.01)


def test_sigterm_interrupts_a_running_comparison_branch(tmp_path):
    """SIGTERM while a comparison branch computes (branches are Prefect task runs in worker threads): the branch is
    interrupted too, so pomona exits 143 within seconds, its flow run Crashed, no MLflow run (parent, method, stage)
    left RUNNING, its server stopped, the interrupted stage left partial for a rerun. Before, the flow engine's task
    runner waited for the running branch to finish (hours of training on a real model) before it let the process
    end: here, never (its evaluation data never ends)."""
    fifo = tmp_path / "heldout.jsonl"
    os.mkfifo(fifo)  # the base branch evaluates first; its held-out data is a stream of blank lines that never ends
    recipe = tmp_path / "c.yaml"
    recipe.write_text(
        f"name: sigterm-compare\ndata: {{path: {REPO / 'tests/data/alpaca_cherry_40.json'}, format: alpaca}}\n"
        "budget: 10\nmethods: [{method: random, seed: 0}]\n"
        "training: {model: {name_or_path: 'tiny:0'}, sft: {max_steps: 1, register_model: false}}\n"
        f"evaluate: {{lm_eval: null, likelihood: {{data: {{path: {fifo}, format: alpaca}}, max_length: 64}}}}\n"
        "evaluate_base: true\n")
    home, log = tmp_path / "home", tmp_path / "pomona.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(home), "run", "--flow", "compare",
                                 str(recipe)], cwd=REPO, env=base_env(), stdout=sink, stderr=subprocess.STDOUT)
    writer, stop = None, threading.Event()
    feeder = None
    try:
        writer = open_writer_once_read(fifo, proc, log)  # the base branch is inside its eval-likelihood stage
        feeder = threading.Thread(target=trickle, args=(writer, stop), daemon=True)
        feeder.start()
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        started = time.monotonic()
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pomona did not exit within 30 s of SIGTERM:\n{log.read_text()[-4000:]}") from None
        took = time.monotonic() - started
        left = prefect_servers_of(proc.pid)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if feeder is not None:
            feeder.join()
        if writer is not None:
            os.close(writer)
        for pid in prefect_servers_of(proc.pid):
            os.kill(pid, signal.SIGTERM)

    output = log.read_text()
    assert code == 128 + signal.SIGTERM, f"exit status {code} after {took:.1f} s:\n{output[-4000:]}"
    assert any("Flow run" in line and "Crash detected" in line for line in output.splitlines()), output[-4000:]
    assert left == [], f"its temporary Prefect server (pids {left}) is still running"
    assert_stopped_not_failed(mlflow_runs(home), {"sigterm-compare", "method:base"})
    interrupted = list((home / "store" / "eval-likelihood").iterdir())
    assert len(interrupted) == 1 and not (interrupted[0] / "_SUCCESS").exists(), interrupted  # partial: resumable


# Loaded by every Python process of the served run (PYTHONPATH): a training rank (torchrun sets LOCAL_RANK) waits on
# the named pipe before it prints anything, as a rank starting up, loading, saving a checkpoint or in a long step does.
RANK_WAITS = """import os
if os.environ.get("LOCAL_RANK") is not None and os.environ.get("POMONA_TEST_RANK_WAITS_ON"):
    with open(os.environ["POMONA_TEST_RANK_WAITS_ON"]) as pipe:
        pipe.read()
"""


def processes_naming(text: str) -> list[str]:
    """Command lines of the live processes (not zombies) whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if text in cmdline:
                    found.append(f"{entry.name}: {cmdline}")
        except (OSError, IndexError):
            continue
    return found


def test_cancelling_a_served_comparison_stops_its_launched_training(prefect_server, tmp_path):
    """The UI's Cancel on a comparison served by `pomona serve`, while a branch's launched training prints nothing:
    the run ends Cancelled within seconds, the launcher and its rank stopped, no MLflow or Prefect run of it left
    running, the training stage partial. The branch (a worker thread) waited in one blocking read of the launcher's
    output, which held off its interrupt: the runner SIGKILLed the flow's process after its 30 s grace, and torchrun
    and its rank trained on (holding the GPUs), the method's and the stage's MLflow runs and Prefect task runs
    RUNNING."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Cancelling

    from configs.compare import CompareConfig
    from configs.pipeline import load_recipe
    from tests.live_servers import BIN, serving_env, start, stop

    hook, fifo, home = tmp_path / "hook", tmp_path / "rank-waits", tmp_path / "home"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RANK_WAITS)
    os.mkfifo(fifo)
    recipe = tmp_path / "c.yaml"
    recipe.write_text(
        f"name: cancel-compare\ndata: {{path: {REPO / 'tests/data/alpaca_cherry_40.json'}, format: alpaca}}\n"
        "budget: 10\nmethods: [{method: random, seed: 0}]\nevaluate_base: false\n"
        "training: {model: {name_or_path: 'tiny:0'}, sft: {max_steps: 1, register_model: false, launcher: torchrun}}\n"
        f"evaluate: {{lm_eval: null, likelihood: {{data: {{path: {REPO / 'tests/data/alpaca_cherry_40.json'}, "
        "format: alpaca}, max_length: 64}}\n")
    parameters = {"config": load_recipe(recipe, model=CompareConfig).model_dump(mode="json")}
    log = tmp_path / "serve.log"
    serve = start([str(BIN / "pomona"), "serve", "--limit", "1"],
                  {**serving_env(PREFECT_API_URL.value(), home, None), "PYTHONPATH": str(hook),
                   "POMONA_TEST_RANK_WAITS_ON": str(fifo)}, log)
    writer = None
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    deployment = client.read_deployment_by_name("pomona-compare/pomona")
                    break
                except ObjectNotFound:
                    assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
                    time.sleep(0.3)
            run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
            writer = open_writer_once_read(fifo, serve, log)  # the branch's training rank is waiting, silent
            client.set_flow_run_state(run.id, Cancelling())  # what the UI's Cancel button does
            started = time.monotonic()
            while not (state := client.read_flow_run(run.id).state).is_final() and time.monotonic() - started < 60:
                time.sleep(0.2)
            took = time.monotonic() - started
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        training = home / "store" / "train-sft"
        deadline = time.monotonic() + 5  # the launcher reaps its rank as it exits: a moment on a slow machine
        while (left := processes_naming(str(training))) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        for line in processes_naming(str(home / "store")):  # a failed run must not leave a training to the suite
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        if writer is not None:
            os.close(writer)
        stop(serve)

    output = log.read_text()
    assert state.is_cancelled() and took < 20, f"{state!r} {took:.1f} s after Cancel:\n{output[-4000:]}"
    assert left == [], f"the launched training outlived its cancelled flow run: {left}"
    still_running = sorted(t.name for t in tasks if t.state is not None and t.state.is_running())
    assert still_running == [], f"Prefect task runs left Running: {still_running}"
    assert_stopped_not_failed(mlflow_runs(home), {"cancel-compare", "method:random", "train-sft"})
    interrupted = list(training.iterdir())
    assert len(interrupted) == 1 and not (interrupted[0] / "_SUCCESS").exists(), interrupted  # partial: resumable


def test_signal_handlers_last_only_as_long_as_the_run_unless_a_signal_ends_it(monkeypatch):
    """In one process (a test, a notebook) a run that ended on its own gives back the handlers it found, so the next
    Ctrl-C is not swallowed as a 'second' signal; a run a signal ends ignores the signals that follow for a while."""
    import _thread

    from flows import cli
    from flows.cli import exit_on_signals

    # Ctrl-C handled as in a terminal (a suite started in the background inherits SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler), signal.getsignal(signal.SIGTERM)
    try:
        with exit_on_signals():
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            assert signal.getsignal(signal.SIGTERM) is not inherited[1]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == inherited[1]
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C as before the run
            _thread.interrupt_main()
            time.sleep(1)
        with pytest.raises(SystemExit) as ended:
            with exit_on_signals():
                signal.raise_signal(signal.SIGTERM)
        assert ended.value.code == 143
        signal.raise_signal(signal.SIGTERM)  # the second: ignored, also after the block (the process is exiting)
        _thread.interrupt_main()
        time.sleep(0.2)
        # ... for a while only: a first interrupt that did not end the run must not make it deaf to the next
        monkeypatch.setattr(cli, "REPEAT_SIGNAL_IGNORED_S", 0.3)
        time.sleep(0.4)
        with pytest.raises(KeyboardInterrupt):
            _thread.interrupt_main()
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, inherited[0])
        signal.signal(signal.SIGTERM, inherited[1])
