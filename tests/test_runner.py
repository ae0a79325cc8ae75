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


def test_scoring_stage_on_a_dask_cluster_equals_the_in_process_stage(prefect_server, dask_local, tiny_model_dir):
    """`scoring.scale_out` moves the score shards onto Dask worker processes; the table and the stage key stay."""
    import shutil

    from configs.ifd import ScoringConfig
    from configs.schema import DataConfig, ModelConfig
    from tasks.data import prepare_records
    from tasks.score import read_scores, score_records
    from tests.conftest import DATA

    records = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=12))
    local = ScoringConfig(scorer=ModelConfig(name_or_path=str(tiny_model_dir)), max_length=256, shard_size=4)
    spread = local.model_copy(update={"scale_out": dask_local})

    @flow
    def score_on_dask():
        return score_records(records, spread, progress=False)

    state = score_on_dask(return_state=True)
    on_dask = state.result()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id])))
    assert sorted(r.name for r in runs) == ["score-shard-00000", "score-shard-00001", "score-shard-00002"]
    dask_rows = read_scores(on_dask)
    assert on_dask.metrics["scored"] == 12 and len(dask_rows) == 12
    shutil.rmtree(on_dask.path)  # same key: without this the in-process run would reuse the Dask result

    in_process = score_records(records, local, progress=False)
    assert in_process.path == on_dask.path  # the runner is not part of what the stage computes
    assert read_scores(in_process) == dask_rows


def test_generation_stage_on_a_dask_cluster_equals_the_in_process_stage(prefect_server, dask_local):
    """`generator.scale_out` moves the generation shards onto Dask workers; same rows, same stage key."""
    import shutil

    from configs.grape import GeneratorConfig, SamplingConfig
    from configs.schema import DataConfig, ModelConfig
    from tasks.data import prepare_records
    from tasks.generate import generate_candidates
    from tasks.store import ShardedTable
    from tests.conftest import DATA

    records = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=6))
    local = GeneratorConfig(name="tiny-1", model=ModelConfig(name_or_path="tiny:1"),
                            sampling=SamplingConfig(max_new_tokens=6, temperature=0), batch_size=3)
    spread = local.model_copy(update={"scale_out": dask_local})

    @flow
    def generate_on_dask():
        return generate_candidates(records, spread, shard_size=3, progress=False)

    on_dask = generate_on_dask()
    dask_rows = ShardedTable(on_dask.file("shards")).read()
    assert len(dask_rows) == 6 and all(r["generator"] == "tiny-1" for r in dask_rows)
    shutil.rmtree(on_dask.path)

    in_process = generate_candidates(records, local, shard_size=3, progress=False)
    assert in_process.path == on_dask.path
    assert ShardedTable(in_process.file("shards")).read() == dask_rows


def test_deita_embedding_stage_on_a_dask_cluster_equals_the_in_process_stage(prefect_server, dask_local,
                                                                             tiny_model_dir):
    import shutil

    import numpy as np

    from configs.deita import DeitaEmbeddingConfig
    from configs.schema import DataConfig, ModelConfig
    from tasks.data import prepare_records
    from tasks.deita import embed_records
    from tests.conftest import DATA

    records = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=10))
    local = DeitaEmbeddingConfig(model=ModelConfig(name_or_path=str(tiny_model_dir)), max_length=128, shard_size=4)
    spread = local.model_copy(update={"scale_out": dask_local})

    @flow
    def embed_on_dask():
        return embed_records(records, spread, progress=False)

    on_dask = embed_on_dask()
    vectors = np.load(on_dask.file("embeddings.npy"))
    assert vectors.shape == (10, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    shutil.rmtree(on_dask.path)

    in_process = embed_records(records, local, progress=False)
    assert in_process.path == on_dask.path
    assert np.allclose(np.load(in_process.file("embeddings.npy")), vectors, atol=1e-6)


def test_deita_scoring_stage_on_a_dask_cluster_equals_the_in_process_stage(prefect_server, dask_local,
                                                                           tiny_model_dir):
    import shutil

    from configs.deita import DeitaScorerConfig
    from configs.schema import DataConfig, ModelConfig
    from tasks.data import prepare_records, read_jsonl
    from tasks.deita import score_complexity
    from tests.conftest import DATA

    records = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=9))
    local = DeitaScorerConfig(model=ModelConfig(name_or_path=str(tiny_model_dir)), shard_size=4)
    spread = local.model_copy(update={"scale_out": dask_local})

    @flow
    def score_on_dask():
        return score_complexity(records, spread)

    on_dask = score_on_dask()
    rows = read_jsonl(on_dask.file("scores.jsonl"))
    assert len(rows) == 9 and all(1 <= s <= 6 for r in rows for s in r["scores"])
    shutil.rmtree(on_dask.path)

    in_process = score_complexity(records, local)
    assert in_process.path == on_dask.path
    again = read_jsonl(in_process.file("scores.jsonl"))
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    assert all(abs(a - b) < 1e-5 for x, y in zip(again, rows) for a, b in zip(x["scores"], y["scores"]))
