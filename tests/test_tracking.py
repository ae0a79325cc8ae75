"""What tracking shows people: links to the MLflow UI, and never a credential (in links, params or config.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs.redact import redact_url, strip_userinfo
from tasks.store import StageOutput
from tests.conftest import REPO

DB_URI = "postgresql+psycopg2://pomona:s3cret@postgres:5432/mlflow"


def test_redact_url_masks_userinfo_and_secret_query_values_only():
    assert redact_url(DB_URI) == "postgresql+psycopg2://***@postgres:5432/mlflow"
    assert redact_url("https://user:pw@api.example.org/v1?api_key=abc&api-version=2024-01") \
        == "https://***@api.example.org/v1?api_key=***&api-version=2024-01"
    assert redact_url("https://h/v1?token=t&x=1") == "https://h/v1?token=***&x=1"
    for plain in ("http://127.0.0.1:8000/v1", "sqlite:////tmp/mlflow.db", "configs/recipes/demo.yaml", "a@b.c",
                  "user:pw@host is not a URL", "https://h/v1?api-version=1"):
        assert redact_url(plain) == plain
    assert strip_userinfo("http://u:p@mlflow:5000/") == "http://mlflow:5000/"


class _Run:
    def __init__(self, tags=None):
        self.info = type("Info", (), {"experiment_id": "7"})()
        self.data = type("Data", (), {"tags": tags or {}})()


@pytest.fixture
def fake_store(monkeypatch):
    """run_link against a given tracking URI without a server: the client only answers get_run."""
    import tasks.track as track

    runs: dict[str, _Run] = {}
    monkeypatch.setattr(track, "client", lambda: type("C", (), {"get_run": staticmethod(runs.__getitem__)})())
    monkeypatch.delenv("POMONA_MLFLOW_UI_URL", raising=False)
    return runs


def test_run_link_never_shows_database_credentials(fake_store, monkeypatch):
    from tasks.track import run_link

    fake_store["r1"] = _Run()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DB_URI)
    link = run_link("r1")
    assert "s3cret" not in link and "pomona:" not in link
    assert link == "run r1 in postgresql+psycopg2://***@postgres:5432/mlflow"
    # an http tracking server with basic auth: a browsable link, without the user:password
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://admin:s3cret@mlflow:5000/")
    assert run_link("r1") == "http://mlflow:5000/#/experiments/7/runs/r1?workflowType=machine_learning"


def test_run_link_points_at_the_public_ui_when_one_is_set(fake_store, monkeypatch):
    from tasks.track import UI_URL_TAG, run_link

    monkeypatch.setenv("MLFLOW_TRACKING_URI", DB_URI)
    monkeypatch.setenv("POMONA_MLFLOW_UI_URL", "https://mlflow.example.org/")
    fake_store["r1"] = _Run()
    assert run_link("r1") == "https://mlflow.example.org/#/experiments/7/runs/r1?workflowType=machine_learning"
    fake_store["r2"] = _Run({UI_URL_TAG: "https://ui.team.example"})  # the recipe's tracking.ui_url wins
    assert run_link("r2") == "https://ui.team.example/#/experiments/7/runs/r2?workflowType=machine_learning"


def test_tracking_ui_url_is_a_described_optional_http_setting():
    from pydantic import ValidationError

    from configs.schema import TrackingConfig

    field = TrackingConfig.model_fields["ui_url"]
    assert field.default is None and "MLflow UI" in field.description
    assert TrackingConfig(ui_url="https://mlflow.example.org/").ui_url == "https://mlflow.example.org"
    with pytest.raises(ValidationError, match="http"):
        TrackingConfig(ui_url="mlflow.example.org")


def test_stage_runs_link_to_the_ui_their_recipe_names(tmp_path):
    """The recipe's tracking.ui_url reaches every stage run's link, through a real (SQLite) MLflow store."""
    from configs.pipeline import load_recipe
    from tasks.track import UI_URL_TAG, client, log_stage_run, run_link, start_parent_run

    config = load_recipe(REPO / "configs" / "recipes" / "demo.yaml",
                         overrides={"tracking.ui_url": "https://mlflow.example.org", "name": "ui-link-test"})
    parent = start_parent_run("unit-test-ui-link", "p", config, None)
    (tmp_path / "stage_key.json").write_text("{}")
    child = log_stage_run(parent, StageOutput(stage="unit", key="k", path=str(tmp_path), digest="d"))
    assert client().get_run(child).data.tags[UI_URL_TAG] == "https://mlflow.example.org"
    experiment = client().get_run(child).info.experiment_id
    # in MLflow 3's "Model training" mode: its breadcrumb leads to the runs table, not to GenAI "Evaluation runs"
    assert run_link(child) == f"https://mlflow.example.org/#/experiments/{experiment}/runs/{child}" \
        "?workflowType=machine_learning"


def test_stage_runs_of_a_compared_method_carry_the_recipes_config_hash(tmp_path):
    """A comparison nests its stage runs under `method:<label>` runs; they took the hash from the method run, which
    had none, so `tags.pomona.config_hash = '<hash>'` found the records and table runs but no method's stages."""
    from configs.pipeline import load_recipe
    from tasks.evaluate import start_method_run
    from tasks.track import CONFIG_HASH_TAG, client, log_stage_run, start_parent_run

    config = load_recipe(REPO / "configs" / "recipes" / "demo.yaml", overrides={"name": "hash-test"})
    parent = start_parent_run("unit-test-config-hash", "p", config, None)
    method = start_method_run(parent, "random", None)
    (tmp_path / "stage_key.json").write_text("{}")
    stage = log_stage_run(method, StageOutput(stage="unit", key="k-hash", path=str(tmp_path), digest="d"))
    mlc = client()
    expected = mlc.get_run(parent).data.tags[CONFIG_HASH_TAG]
    assert expected and mlc.get_run(method).data.tags[CONFIG_HASH_TAG] == expected
    assert mlc.get_run(stage).data.tags[CONFIG_HASH_TAG] == expected
    for run_id in (method, parent):
        mlc.set_terminated(run_id, "FINISHED")


# ------------------------------------------------------------------------------ secrets in endpoint URLs
SECRET_URL = "https://alice:pa55word@llm.example.org/v1?api_key=SECRETKEY&api-version=2024-06"
SECRETS = ("pa55word", "SECRETKEY", "alice")


def secret_generator(url: str = SECRET_URL):
    from configs.grape import EndpointConfig, GeneratorConfig

    return GeneratorConfig(name="hosted", backend="openai", endpoint=EndpointConfig(base_url=url, model="m"))


def test_endpoint_secrets_never_reach_mlflow_params_or_config_yaml(tmp_path):
    from tasks.track import client, flatten, log_stage_run, start_parent_run

    generator = secret_generator()
    params = flatten(generator)
    assert params["endpoint.base_url"] == "https://***@llm.example.org/v1?api_key=***&api-version=2024-06"
    assert flatten({"urls": [SECRET_URL]})["urls"] == '["https://***@llm.example.org/v1?api_key=***&api-version=2024-06"]'

    parent = start_parent_run("unit-test-secrets", "p", generator, None)
    (tmp_path / "stage_key.json").write_text("{}")
    out = StageOutput(stage="generate", key="k", path=str(tmp_path), digest="d", params={"endpoint": SECRET_URL})
    child = log_stage_run(parent, out, config=generator)
    for run_id in (parent, child):
        logged = client().get_run(run_id).data.params
        assert "llm.example.org" in " ".join(logged.values())
        assert not [v for v in logged.values() for s in SECRETS if s in v], logged
    config_yaml = Path(client().download_artifacts(parent, "config.yaml", str(tmp_path))).read_text()
    assert "llm.example.org" in config_yaml and not any(s in config_yaml for s in SECRETS)


def test_endpoint_secrets_stay_out_of_stage_keys_and_generation_params():
    import json

    from models.generation import generation_params
    from tasks.store import canonical, stage_key

    material = json.dumps(canonical(secret_generator()))
    assert "llm.example.org" in material and not any(s in material for s in SECRETS)
    # a rotated key or password reaches the same endpoint: same stage
    rotated = SECRET_URL.replace("pa55word", "n3w").replace("SECRETKEY", "NEWKEY")
    assert stage_key("generate", secret_generator(), []) == stage_key("generate", secret_generator(rotated), [])
    assert stage_key("generate", secret_generator(), []) != stage_key(
        "generate", secret_generator(SECRET_URL.replace("llm.", "other.")), [])
    shown = json.dumps(generation_params(secret_generator()))
    assert "llm.example.org" in shown and not any(s in shown for s in SECRETS)


# ------------------------------------------------------------------------------------- killed runs
def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporary_prefect_servers_of_killed_pomona_processes_are_stopped():
    """kill -9 of a pomona process skips Prefect's exit hook, so its temporary server runs on; the next run stops
    it - and only it: not the server of a live pomona process, not a server pomona did not start."""
    import os
    import subprocess
    import sys

    from configs.settings import OWNER_PID_ENV
    from tasks.track import PREFECT_SERVER_APP, reap_orphan_prefect_servers

    def fake_server(owner: str | None):
        env = {k: v for k, v in os.environ.items() if k != OWNER_PID_ENV}
        if owner is not None:
            env[OWNER_PID_ENV] = owner
        # the app name as an argument, as Prefect's uvicorn command line holds it
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", PREFECT_SERVER_APP], env=env)

    orphan, live, foreign = fake_server(str(_dead_pid())), fake_server(str(os.getpid())), fake_server(None)
    try:
        import time

        time.sleep(0.3)  # let each process exec, so /proc shows its own command line and environment
        with pytest.warns(UserWarning, match=r"stopped \d+ temporary Prefect server"):
            stopped = reap_orphan_prefect_servers()  # real orphans of this machine may be among them
        assert orphan.pid in stopped and live.pid not in stopped and foreign.pid not in stopped
        assert orphan.wait(timeout=10) != 0
        assert live.poll() is None and foreign.poll() is None
    finally:
        for p in (orphan, live, foreign):
            p.kill()
            p.wait()


def test_the_temporary_prefect_server_is_out_of_reach_of_the_terminals_ctrl_c():
    """Ctrl-C signals the terminal's whole foreground process group: with the temporary Prefect server in it, the
    server died with the interrupted run, whose crash handling then hung for minutes retrying the vanished API. The
    server `pomona run` starts is in a session of its own, launched with Prefect's own command line."""
    import os
    import time

    from prefect.server.api.server import SubprocessASGIServer

    from tasks.track import PREFECT_SERVER_APP, detach_temporary_prefect_server

    detach_temporary_prefect_server()
    detach_temporary_prefect_server()  # a second call must not wrap the launch twice
    server = SubprocessASGIServer(port=_free_port())
    process = server._run_uvicorn_command()
    try:
        assert os.getsid(process.pid) == process.pid != os.getsid(0)
        assert os.getpgid(process.pid) != os.getpgid(0)
        cmdline = Path(f"/proc/{process.pid}/cmdline")
        for _ in range(100):  # the child shows its command line once it has exec'd (empty just after the fork)
            if cmdline.read_bytes():
                break
            time.sleep(0.05)
        assert PREFECT_SERVER_APP.encode() in cmdline.read_bytes()
    finally:
        process.kill()
        process.wait()
        SubprocessASGIServer._instances.pop(server._instance_key, None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_run_whose_process_was_killed_is_ended_by_the_next_run(prefect_server):
    """kill -9 leaves the pipeline's MLflow run RUNNING and its Prefect flow run Running (nothing of the killed
    process can end them); the next run on this machine marks them KILLED / Crashed, and leaves live ones alone."""
    import socket

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    from configs.pipeline import load_recipe
    from tasks.track import ENDED_BY_TAG, HOST_TAG, PID_TAG, client, start_parent_run

    @flow(name="pomona-killed-run-test")
    def killed_flow():
        pass

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.create_flow_run(killed_flow)
        prefect.set_flow_run_state(flow_run.id, Running(), force=True)
    config = load_recipe(REPO / "configs" / "recipes" / "demo.yaml", overrides={"name": "killed-run-test"})
    mlc = client()
    first = start_parent_run("unit-test-killed-runs", "first", config, str(flow_run.id))
    child = mlc.create_run(mlc.get_run(first).info.experiment_id, run_name="train-sft",
                           tags={"mlflow.parentRunId": first, HOST_TAG: socket.gethostname()})
    live = start_parent_run("unit-test-killed-runs", "live", config, None)  # this process: alive
    elsewhere = start_parent_run("unit-test-killed-runs", "other-host", config, None)
    dead = str(_dead_pid())
    for run_id in (first, child.info.run_id):
        mlc.set_tag(run_id, PID_TAG, dead)
    mlc.set_tag(elsewhere, PID_TAG, dead)
    mlc.set_tag(elsewhere, HOST_TAG, "another-machine")

    rerun = start_parent_run("unit-test-killed-runs", "rerun", config, None)
    status = {run_id: mlc.get_run(run_id).info.status for run_id in (first, child.info.run_id, live, elsewhere, rerun)}
    assert status == {first: "KILLED", child.info.run_id: "KILLED", live: "RUNNING", elsewhere: "RUNNING",
                      rerun: "RUNNING"}
    assert dead in mlc.get_run(first).data.tags[ENDED_BY_TAG]
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(flow_run.id).state.type.value == "CRASHED"
    for run_id in (live, elsewhere, rerun):
        mlc.set_terminated(run_id, "FINISHED")


def test_a_reused_stage_points_at_the_run_that_holds_its_files_instead_of_copying_them(tmp_path):
    """Each rerun of a finished pipeline logs a cached child run per stage; copying every stage file into each of
    them stored the scores, rankings and subsets once more per rerun. A cached run keeps the stage key, params,
    metrics and dataset inputs, and points at the run that computed the stage; with no such run in its experiment
    (a stage computed under another recipe) it logs the files itself."""
    from configs.pipeline import load_recipe
    from tasks.track import ARTIFACTS_RUN_TAG, client, log_stage_run, start_parent_run

    (tmp_path / "stage_key.json").write_text("{}")
    (tmp_path / "scores.jsonl").write_text('{"id": "a", "ifd": 0.5}\n' * 1000)
    (tmp_path / "subset.messages.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    out = StageOutput(stage="unit", key="k-reuse", path=str(tmp_path), digest="d-reuse", artifacts=["scores.jsonl"],
                      datasets=[{"name": "unit-subset", "file": "subset.messages.jsonl", "digest": "abc"}])
    config = load_recipe(REPO / "configs" / "recipes" / "demo.yaml", overrides={"name": "reuse-test"})
    mlc = client()
    elsewhere = start_parent_run("unit-test-reuse-other", "other", config, None)
    alone = log_stage_run(elsewhere, out, cached=True)  # nothing in its experiment computed it
    first_parent = start_parent_run("unit-test-reuse", "first", config, None)
    computed = log_stage_run(first_parent, out, cached=False)
    second_parent = start_parent_run("unit-test-reuse", "second", config, None)
    cached = log_stage_run(second_parent, out, cached=True)

    def files(run_id):
        return {a.path for a in mlc.list_artifacts(run_id)}

    assert files(computed) == files(alone) == {"stage_key.json", "scores.jsonl"}
    assert files(cached) == {"stage_key.json"}
    assert mlc.get_run(cached).data.tags[ARTIFACTS_RUN_TAG] == computed
    assert ARTIFACTS_RUN_TAG not in mlc.get_run(alone).data.tags
    assert [i.dataset.digest for i in mlc.get_run(cached).inputs.dataset_inputs] == ["abc"]
    for run_id in (elsewhere, first_parent, second_parent):
        mlc.set_terminated(run_id, "FINISHED")
