"""Scale-out: shards mapped as Prefect task runs on a local Dask cluster (prefect-dask) or threads, resumable."""

from __future__ import annotations

import os
import time

import pytest
from prefect import flow, task

from configs.runner import ScaleOutConfig
from tasks.runner import map_shards, task_runner
from tasks.store import ShardedTable

SHARD = 4


def squares(index: int, size: int, fail_on: int | None = None) -> list[dict]:
    """A shard function as stages write them: module-level, small arguments, rows out."""
    if index == fail_on:
        raise RuntimeError(f"shard {index} failed")
    return [{"x": x, "square": x * x, "pid": os.getpid()} for x in range(index * size, (index + 1) * size)]


def expected(n: int) -> list[dict]:
    return [{"x": x, "square": x * x} for x in range(n * SHARD)]


def rows_of(table: ShardedTable) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "pid"} for row in table.read()]


@pytest.fixture(scope="module")
def dask_local():
    return ScaleOutConfig(engine="dask", workers=2, threads_per_worker=1, processes=True)


def test_config_selects_the_runner():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert isinstance(task_runner(ScaleOutConfig()), ThreadPoolTaskRunner)
    remote = task_runner(ScaleOutConfig(engine="dask", address="tcp://10.0.0.5:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    with pytest.raises(ValueError, match="engine: dask"):
        ScaleOutConfig(address="tcp://10.0.0.5:8786")


def test_dask_cluster_computes_shards_in_worker_processes_and_resumes(prefect_server, dask_local, tmp_path):
    table = ShardedTable(tmp_path / "scores")
    with pytest.raises(RuntimeError, match="shard 3 failed"):
        map_shards(squares, 6, table, dask_local, name="squares", size=SHARD, fail_on=3)
    assert table.done() == {0, 1, 2, 4, 5}  # the finished shards were kept
    first_pids = {row["pid"] for row in table.read()}
    assert os.getpid() not in first_pids  # computed in Dask worker processes, not here

    # Resume reads the manifest, whatever engine wrote it (threads here: one cluster start less).
    counts = map_shards(squares, 6, table, ScaleOutConfig(), name="squares", size=SHARD)
    assert counts == {"shards_computed": 1, "shards_reused": 5, "rows_written": SHARD}
    assert rows_of(table) == expected(6)


@task(name="embed-stage")
def embed_stage(folder: str) -> dict:
    """How a stage uses it: inside its Prefect task, the shards become task runs nested under it."""
    return map_shards(squares, 3, ShardedTable(folder), ScaleOutConfig(engine="threads", workers=2),
                      name="embed-test", size=SHARD)


@flow(name="scale-out-test")
def embed_flow(folder: str) -> dict:
    return embed_stage(folder)


def test_threads_engine_maps_shards_as_task_runs_inside_a_stage(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    state = embed_flow(str(tmp_path / "emb"), return_state=True)
    assert state.result() == {"shards_computed": 3, "shards_reused": 0, "rows_written": 3 * SHARD}
    assert rows_of(ShardedTable(tmp_path / "emb")) == expected(3)
    assert embed_flow(str(tmp_path / "emb"))["shards_reused"] == 3
    runs = []
    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        # Task runs reach the API as events: on a loaded machine they can trail the flow's return.
        while len(runs) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
            runs = client.read_task_runs(
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="embed-test-shard")))
    assert sorted(r.name for r in runs) == ["embed-test-shard-00000", "embed-test-shard-00001", "embed-test-shard-00002"]
    assert {r.state.name for r in runs} == {"Completed"}
    assert {str(r.flow_run_id) for r in runs} == {str(state.state_details.flow_run_id)}
