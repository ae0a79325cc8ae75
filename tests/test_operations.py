"""Operating pomona against real servers: `prefect server start`, `mlflow server`, `pomona serve`.

The pipeline deployment is triggered through the API with the test-only `fail_at` switch, fails in its selection
stage, is retried the way the UI's Retry button does it, and rerun with the same parameters. Finished stages
must come back Cached with their files untouched, and the outputs must equal an uninterrupted run's.
Backends are PostgreSQL when 127.0.0.1:5432 answers (the production setup), else SQLite.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.live_servers import (DEPLOYMENT, EXPERIMENT, FAIL_STAGE, LiveStack, file_stamps, postgres_reachable,
                                prefect_api, rerun_scenario, scenario_recipe)


@pytest.fixture(scope="module")
def scenario():
    return rerun_scenario()


@pytest.fixture(scope="module")
def api():
    """Point this process's Prefect client at the live server (for in-process flows and deployments)."""
    stack = LiveStack.shared()
    with prefect_api(stack.prefect_api):
        yield stack


def test_failed_stage_fails_alone_and_leaves_nothing_cached(scenario):
    failed, after = scenario.failed, scenario.after_failure
    assert failed.state.is_failed() and failed.run_count == 1
    assert "failed on purpose" in (after["state"].message or "")
    assert after["states"]["prepare-records"] == ["Completed"]
    assert after["states"][FAIL_STAGE] == ["Failed"]
    assert "records.jsonl" in after["records"], "prepare-records wrote its files before the failure"
    # The failed stage raised before writing anything: no folder, so no `_SUCCESS` to be mistaken for a result.
    assert not after["select_dir_exists"]


def test_retry_resumes_after_the_finished_stages(scenario):
    retried, after = scenario.retried, scenario.after_retry
    assert retried.state.is_completed() and retried.run_count == 2
    # Task runs of both attempts of the same flow run, oldest first.
    assert after["states"]["prepare-records"] == ["Completed", "Cached"]
    assert after["states"][FAIL_STAGE] == ["Failed", "Completed"]
    assert after["records"] == scenario.after_failure["records"]  # not one file of the finished stage rewritten


def test_rerun_with_same_parameters_is_all_cached(scenario):
    assert scenario.rerun.state.is_completed()
    states = scenario.stack.task_states(scenario.rerun.id)
    assert states["prepare-records"] == ["Cached"] and states[FAIL_STAGE] == ["Cached"]
    records = scenario.reference["records"]
    served = scenario.stack.pomona_home / "store" / records.stage / records.key
    assert file_stamps(served) == scenario.after_retry["records"]


def test_outputs_equal_an_uninterrupted_run(scenario):
    compared = 0
    for out in scenario.reference.values():
        served = scenario.stack.pomona_home / "store" / out.stage / out.key
        assert (served / "_SUCCESS").exists(), f"{out.stage} has no finished output at {served}"
        assert json.loads((served / "_SUCCESS").read_text())["digest"] == out.digest, out.stage
        for name in ("records.jsonl", "selected_ids.txt", "subset.jsonl", "subset.messages.jsonl"):
            if (Path(out.path) / name).exists():
                assert (served / name).read_bytes() == (Path(out.path) / name).read_bytes(), name
                compared += 1
    assert compared == 4
    assert len((Path(scenario.reference["selection"].path) / "selected_ids.txt").read_text().split()) == 23


def test_mlflow_server_holds_each_attempt_with_cached_stages_marked(scenario):
    from mlflow import MlflowClient

    mlc = MlflowClient(scenario.stack.mlflow_url)
    runs = mlc.search_runs([mlc.get_experiment_by_name(EXPERIMENT).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    # The failed attempt and its retry share one Prefect flow run id: two parent runs, one FAILED.
    attempts = [r for r in parents if r.data.tags["prefect.flow_run_id"] == str(scenario.failed.id)]
    assert sorted(r.info.status for r in attempts) == ["FAILED", "FINISHED"]
    rerun_parent = next(r for r in parents if r.data.tags["prefect.flow_run_id"] == str(scenario.rerun.id))
    children = {r.data.tags["pomona.stage"]: r.data.tags["pomona.cached"] for r in runs
                if r.data.tags.get("mlflow.parentRunId") == rerun_parent.info.run_id}
    assert children == {"records": "true", "select-random": "true"}


def test_unknown_fail_at_stage_is_an_error(api):
    from configs.errors import ConfigError
    from flows.pipeline import pipeline

    with pytest.raises(ConfigError, match="matched no stage"):
        pipeline(scenario_recipe(**{"tracking.enabled": False, "selection.budget": 5}), fail_at="select-typo")


def test_served_deployment_renders_a_typed_form_with_defaults(api):
    with api.client() as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    assert {"pomona", "pipeline"} <= set(deployment.tags)
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "ENQUEUE"
    assert deployment.entrypoint == "flows.pipeline.pipeline"
    schema = deployment.parameter_openapi_schema
    assert schema["properties"]["fail_at"]["default"] is None
    assert "Test-only" in schema["properties"]["fail_at"]["description"]
    assert "Recipe name" in schema["definitions"]["PipelineConfig"]["properties"]["name"]["description"]
    assert "Keep exactly this many" in schema["definitions"]["RandomSelection"]["properties"]["budget"]["description"]
    assert deployment.parameters["config"]["name"] == "demo"  # the demo recipe pre-fills the form


def test_served_deployment_refuses_a_bad_value_naming_its_field(api):
    """What the UI shows when Submit is pressed with a budget of -5 (its toast is the server's `detail`)."""
    from prefect.exceptions import PrefectHTTPStatusError

    with api.client() as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        config = {**deployment.parameters["config"]}
        config["selection"] = {**config["selection"], "budget": -5}
        with pytest.raises(PrefectHTTPStatusError) as refused:
            client.create_flow_run_from_deployment(deployment.id, parameters={"config": config})
    assert refused.value.response.status_code == 409
    assert refused.value.response.json()["detail"] == (
        "Error creating flow run: Validation failed for field 'config.selection.budget'. "
        "Failure reason: -5 is less than the minimum of 1")


def test_deploy_registers_every_flow_on_a_work_pool(api):
    from flows.serve import deploy, discover_flows

    ids = deploy("pomona-test-pool", name="pool-test")
    assert len(ids) == len(discover_flows()) >= 1
    with api.client() as client:
        pool = client.read_work_pool("pomona-test-pool")
        deployment = client.read_deployment_by_name("pomona-pipeline/pool-test")
        pooled = [client.read_deployment(i) for i in ids]
    assert pool.type == "process"
    assert {d.work_pool_name for d in pooled} == {"pomona-test-pool"}
    assert {d.name for d in pooled} == {"pool-test"} and all("pomona" in d.tags for d in pooled)
    assert deployment.id in {d.id for d in pooled} and deployment.entrypoint == "flows.pipeline.pipeline"
    # runs start where `pomona deploy` ran (the project), not in the process worker's temporary folder
    assert {d.job_variables.get("working_dir") for d in pooled} == {str(Path.cwd().resolve())}


def test_work_pool_deployments_start_their_runs_in_the_project_folder(tmp_path):
    """A process worker runs a deployment in a temporary folder unless its `working_dir` job variable is set; the
    worker's own job configuration (built as a worker builds it) must carry pomona's folder."""
    import asyncio

    from prefect.workers.process import ProcessWorker

    from flows.serve import build_deployments, project_dir

    built = build_deployments(work_pool="some-pool", working_dir=tmp_path)
    assert {d.job_variables["working_dir"] for d in built} == {str(tmp_path)}
    configuration = asyncio.run(ProcessWorker.job_configuration.from_template_and_values(
        ProcessWorker.get_default_base_job_template(), built[0].job_variables))
    assert configuration.working_dir == tmp_path
    assert all(not d.job_variables for d in build_deployments())  # `pomona serve` runs in its own folder
    assert project_dir() == Path.cwd().resolve()
    from configs.errors import ConfigError
    with pytest.raises(ConfigError, match="not a folder"):
        project_dir(tmp_path / "missing")


@pytest.mark.postgres
@pytest.mark.skipif(not postgres_reachable(), reason="no PostgreSQL at 127.0.0.1:5432")
def test_production_backends_hold_the_runs_in_postgresql(scenario):
    """Prefect (asyncpg) and MLflow (psycopg2) kept the scenario's state in their own PostgreSQL databases."""
    import psycopg2

    assert scenario.stack.backend == "postgres", "POMONA_TEST_BACKEND forced SQLite"
    prefect_db, mlflow_db = scenario.stack.databases
    with psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=prefect_db) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT run_count, state_name FROM flow_run WHERE id = %s", (str(scenario.failed.id),))
            assert cur.fetchone() == (2, "Completed")  # the retried run, in Prefect's PostgreSQL database
    with psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=mlflow_db) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs r JOIN experiments e USING (experiment_id) WHERE e.name = %s",
                        (EXPERIMENT,))
            assert cur.fetchone()[0] >= 8  # 3 parents + their stage children, in MLflow's PostgreSQL database


def test_every_flow_module_becomes_a_deployment_with_tags_limits_and_recipe_defaults():
    import importlib

    from flows.serve import build_deployments, discover_flows

    deployments = {d.flow_name: d for d in build_deployments()}
    assert set(deployments) == {f.name for _, f in discover_flows()} >= {"pomona-pipeline"}
    for name, d in deployments.items():
        assert d.name == "pomona" and d.tags[0] == "pomona" and len(d.tags) >= 2, name
        assert d.concurrency_limit == 1 and d.concurrency_options.collision_strategy == "ENQUEUE", name
        module, attr = d.entrypoint.rsplit(".", 1)
        assert getattr(importlib.import_module(module), attr).name == name  # what a worker will import
        assert d._parameter_openapi_schema.properties, name
    assert deployments["pomona-pipeline"].parameters["config"]["name"] == "demo"
    # a recipe validating as the flow's config pre-fills its form (every flow has one)
    assert deployments["pomona-compare"].parameters["config"]["name"] == "compare-tiny"
    assert deployments["pomona-sft"].parameters["config"]["name"] == "sft-tiny"
