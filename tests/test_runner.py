"""Scale-out: shards mapped as Prefect task runs on a local Dask cluster (prefect-dask) or threads, resumable."""

from __future__ import annotations

import os
import signal
import threading
import time
import weakref
from pathlib import Path

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


@pytest.fixture(scope="module")
def dask_running():
    """One Dask cluster the stage tests reach by `address`, as a user's existing scheduler: its worker processes
    import torch once for all of them (a local cluster per stage costs ~15 s here)."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield ScaleOutConfig(engine="dask", address=cluster.scheduler_address, workers=2)


def test_config_selects_the_runner():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    assert isinstance(task_runner(ScaleOutConfig()), ThreadPoolTaskRunner)
    remote = task_runner(ScaleOutConfig(engine="dask", address="tcp://10.0.0.5:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.0.0.5:8786"
    with pytest.raises(ValueError, match="engine: dask"):
        ScaleOutConfig(address="tcp://10.0.0.5:8786")


def test_a_worker_loads_a_model_folder_again_once_it_changed(tmp_path, monkeypatch):
    # A worker process (a Dask worker, the stage's own process in threads mode) outlives a run: a model folder
    # retrained in place is a new stage key, and its shards must then score with the new weights, not the
    # ones this process loaded for the old key.
    import models.deita
    import models.generation
    import models.loading
    from configs.deita import DeitaScorerConfig
    from configs.grape import GeneratorConfig
    from configs.schema import ModelConfig
    from tasks.deita import _worker_scorer
    from tasks.generate import _worker_generator
    from tasks.runner import worker_model

    loads = []
    monkeypatch.setattr(models.loading, "load_model", lambda cfg: loads.append("model") or len(loads))
    monkeypatch.setattr(models.deita.DeitaScorer, "load", lambda *args: loads.append("scorer") or len(loads))
    monkeypatch.setattr(models.generation, "make_generator", lambda cfg: loads.append("generator") or len(loads))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights v1")
    model = ModelConfig(name_or_path=str(folder))
    scorer = DeitaScorerConfig(model=model).model_dump_json()
    generator = GeneratorConfig(name="g", model=model).model_dump_json()

    def load_all():
        with (worker_model(model.model_dump_json()) as loaded, _worker_scorer("quality", scorer) as quality,
              _worker_generator(generator) as backend):
            return loaded, quality, backend

    first = load_all()
    assert load_all() == first and len(loads) == 3  # one load per process and folder
    (folder / "model.safetensors").write_bytes(b"weights v2, retrained")
    again = load_all()
    assert len(loads) == 6 and set(again).isdisjoint(first)


class Loaded:
    """A loaded model as the worker caches hold it: closed once, by whoever evicts it."""

    def __init__(self, name: str):
        self.name = name
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


class Loader:
    def __init__(self):
        self.loaded: list[Loaded] = []

    def __call__(self, name: str):
        def load() -> Loaded:
            self.loaded.append(Loaded(name))
            return self.loaded[-1]
        return load


def test_worker_cache_closes_exactly_the_entry_it_evicts():
    from tasks.runner import WorkerCache

    cache, load = WorkerCache(size=2), Loader()
    for name in ("a", "b", "a", "c"):  # "a" used again: "b" is the least recently used when "c" comes
        with cache.use(name, "", load(name)):
            pass
    a, b, c = load.loaded
    assert [m.name for m in load.loaded] == ["a", "b", "c"] and (a.closed, b.closed, c.closed) == (0, 1, 0)


def test_worker_cache_hits_do_not_reload():
    from tasks.runner import WorkerCache

    cache, load = WorkerCache(size=1), Loader()
    with cache.use("a", "v1", load("a")) as first:
        pass
    with cache.use("a", "v1", load("a")) as again:
        assert again is first
    assert len(load.loaded) == 1 and not first.closed


def test_worker_cache_reloads_a_changed_stamp_and_closes_the_old_entry():
    # with room to spare, the stale entry must still go: its weights are never served again
    from tasks.runner import WorkerCache

    cache, load = WorkerCache(size=2), Loader()
    with cache.use("a", "v1", load("a")) as old:
        pass
    with cache.use("a", "v2", load("a")) as new:
        assert new is not old
    assert old.closed == 1 and not new.closed


def test_worker_cache_closes_the_old_generator_before_the_next_loads():
    # one GPU fits one vLLM engine: the second may load only once the first gave its memory back
    from tasks.runner import WorkerCache

    cache, load = WorkerCache(size=1), Loader()
    with cache.use("a", "", load("a")) as a:
        pass

    def load_b():
        assert a.closed == 1
        return load("b")()

    with cache.use("b", "", load_b):
        pass


def test_worker_cache_drops_entries_without_close():
    from tasks.runner import WorkerCache

    cache, loads = WorkerCache(size=1), []
    with cache.use("a", "", lambda: loads.append("a") or ("model", "tokenizer")) as pair:
        assert pair == ("model", "tokenizer")
    with cache.use("b", "", lambda: loads.append("b") or ("model", "tokenizer")):
        pass
    with cache.use("a", "", lambda: loads.append("a") or ("model", "tokenizer")):
        pass
    assert loads == ["a", "b", "a"]


def test_dropping_idle_entries_closes_every_one_when_one_close_fails():
    from tasks.runner import WorkerCache

    class FailingClose(Loaded):
        def close(self) -> None:
            super().close()
            raise RuntimeError("engine already dead")

    cache, load = WorkerCache(size=3), Loader()
    with cache.use("failing", "", lambda: FailingClose("failing")) as failing:
        pass
    for name in ("b", "c"):
        with cache.use(name, "", load(name)):
            pass
    with pytest.raises(RuntimeError, match="engine already dead"):
        cache.drop_idle()
    assert failing.closed == 1 and [m.closed for m in load.loaded] == [1, 1]  # b and c did not stay loaded
    with cache.use("b", "", load("b")):  # and nothing is left behind: the next use loads afresh
        pass
    assert len(load.loaded) == 3


def test_worker_cache_closes_an_entry_in_use_when_its_last_user_is_done():
    # Shards of two stages (parallel compare branches) may share a process: evicting must not close a model
    # under a shard still generating with it.
    from tasks.runner import WorkerCache

    cache, load = WorkerCache(size=1), Loader()
    with cache.use("a", "", load("a")) as a:
        with cache.use("b", "", load("b")) as b:
            assert not a.closed
        assert not a.closed
    assert a.closed == 1 and not b.closed
    with cache.use("b", "", load("b")):
        cache.drop_idle()  # b is in use: kept
    assert not b.closed
    cache.drop_idle()
    assert b.closed == 1
    cache.drop_idle()  # nothing left: nothing closed twice
    assert b.closed == 1


def test_worker_cache_loads_once_for_concurrent_shards():
    from concurrent.futures import ThreadPoolExecutor

    from tasks.runner import WorkerCache

    cache, loads = WorkerCache(size=1), []

    def slow_load():
        loads.append(1)
        time.sleep(0.05)  # other shards ask meanwhile
        return Loaded("a")

    def shard(_):
        with cache.use("a", "", slow_load) as model:
            return model

    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(shard, range(8)))
    assert len(loads) == 1 and len({id(m) for m in models}) == 1


HELD = []


def shard_with_a_cached_model(index: int) -> list[dict]:
    from tasks.runner import WORKER_MODELS

    with WORKER_MODELS.use("test-model", "", lambda: HELD.append(Loaded("m")) or HELD[-1]) as model:
        return [{"x": index, "model": model.name}]


def test_a_threads_engine_stage_lets_go_of_the_models_its_shards_loaded(prefect_server, tmp_path):
    # its shards ran in the flow's process: a scorer kept there would hold its (GPU) memory through later stages,
    # where the in-process path loads per stage
    HELD.clear()
    counts = map_shards(shard_with_a_cached_model, 3, ShardedTable(tmp_path / "t"),
                        ScaleOutConfig(engine="threads", workers=2), name="cached-model", progress=False)
    assert counts["shards_computed"] == 3 and len(HELD) == 1 and HELD[0].closed == 1


class MarkedOnClose:
    """A cached value that leaves files when loaded and closed: a Dask worker process loads and closes it, the test
    process looks."""

    def __init__(self, folder: str, close_fails: bool):
        self.name = Path(folder) / f"{os.getpid()}-{id(self)}"
        self.close_fails = close_fails
        self.name.with_suffix(".loaded").touch()

    def close(self) -> None:
        if self.close_fails:
            raise RuntimeError("close failed")
        self.name.with_suffix(".closed").touch()


def shard_with_a_value_marked_on_close(index: int, folder: str, fail_on: int | None = None,
                                       close_fails: bool = False) -> list[dict]:
    from tasks.runner import WORKER_MODELS

    with WORKER_MODELS.use(("marked-on-close", folder), "", lambda: MarkedOnClose(folder, close_fails)):
        if index == fail_on:
            raise RuntimeError(f"shard {index} failed")
        return [{"x": index}]


def test_a_stage_on_an_external_dask_cluster_releases_its_workers_cached_models(prefect_server, dask_running,
                                                                               tmp_path):
    # the workers outlive the stage: a generator's vLLM engine kept there would hold the GPU through later stages
    # (a training on it); released after a failed shard too, whose error the stage still raises
    from distributed import Client

    with pytest.raises(RuntimeError, match="shard 2 failed"):
        map_shards(shard_with_a_value_marked_on_close, 4, ShardedTable(tmp_path / "t"), dask_running,
                   name="released", progress=False, folder=str(tmp_path), fail_on=2)
    loaded = {p.stem for p in tmp_path.glob("*.loaded")}
    assert loaded and {p.stem for p in tmp_path.glob("*.closed")} == loaded
    with Client(dask_running.address) as client:  # the cluster is still up, its workers the same processes
        worker_pids = set(client.run(os.getpid).values())
    assert len(worker_pids) == 2 and {int(name.split("-")[0]) for name in loaded} <= worker_pids


@pytest.mark.parametrize("engine", ["threads", "external dask"])
def test_a_failed_release_of_cached_models_is_logged_not_raised(prefect_server, tmp_path, caplog, request, engine):
    # a model that fails to close (a dead vLLM engine) must not fail a stage whose shards all succeeded
    import logging

    config = (request.getfixturevalue("dask_running") if engine == "external dask"
              else ScaleOutConfig(engine="threads", workers=2))
    with caplog.at_level(logging.WARNING, logger="pomona.runner"):
        counts = map_shards(shard_with_a_value_marked_on_close, 2, ShardedTable(tmp_path / "t"), config,
                            name="release-fails", progress=False, folder=str(tmp_path), close_fails=True)
    assert counts["shards_computed"] == 2
    whose = "the Dask workers'" if engine == "external dask" else "this process's"
    assert f"could not release {whose} cached models" in caplog.text and "close failed" in caplog.text


class FakeGenerator(Loaded):
    def generate(self, conversations, seed, progress=False):
        from models.generation import Generation

        return [Generation(f"answer {i}", 1, 1, "stop", seed) for i in range(len(conversations))]


def test_threads_engine_generate_stage_closes_its_generator_as_the_in_process_stage_does(prefect_server,
                                                                                          monkeypatch):
    # GRAPE's stages after its last generator (fit, training) must get the GPU back from its vLLM engine
    import models.generation
    from configs.grape import GeneratorConfig
    from configs.schema import ModelConfig
    from tasks.generate import generate_candidates

    made: list[FakeGenerator] = []
    monkeypatch.setattr(models.generation, "make_generator",
                        lambda config: made.append(FakeGenerator(config.name)) or made[-1])
    generator = GeneratorConfig(name="closed-after-stage", model=ModelConfig(name_or_path="tiny-not-on-disk"),
                                scale_out=ScaleOutConfig(engine="threads", workers=2))
    out = generate_candidates(records_slice(4), generator, shard_size=2, progress=False)
    assert out.metrics["responses"] == 4
    assert len(made) == 1 and made[0].closed == 1


def test_dask_cluster_computes_shards_in_worker_processes_and_resumes(prefect_server, dask_local, tmp_path):
    table = ShardedTable(tmp_path / "scores")
    with pytest.raises(RuntimeError, match="shard 3 failed"):
        map_shards(squares, 6, table, dask_local, name="squares", size=SHARD, fail_on=3)
    # The finished shards were kept: 0-3 fill the window of 4; 4 and 5 ran only if a shard finished before 3 failed.
    kept = table.done()
    assert {0, 1, 2} <= kept <= {0, 1, 2, 4, 5}
    first_pids = {row["pid"] for row in table.read()}
    assert os.getpid() not in first_pids  # computed in Dask worker processes, not here

    # Resume reads the manifest, whatever engine wrote it (threads here: one cluster start less).
    counts = map_shards(squares, 6, table, ScaleOutConfig(), name="squares", size=SHARD)
    assert counts == {"shards_computed": 6 - len(kept), "shards_reused": len(kept),
                      "rows_written": (6 - len(kept)) * SHARD}
    assert rows_of(table) == expected(6)


class Rows(list):
    """A shard's rows that a weak reference can watch (a plain list cannot be weakly referenced)."""


class Watch:
    """What the bounded-window tests observe: shards started, shards written, results still alive."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started: list[int] = []
        self.written: list[int] = []
        self.alive: list[weakref.ref] = []
        self.most_unwritten = 0  # started and not yet written, at any shard start
        self.most_alive = 0  # shard results not yet freed, at any write

    def write(self, table: ShardedTable):
        def write(index: int, rows: Rows) -> None:
            time.sleep(0.02)  # a slow writer: unbounded submission lets finished results pile up meanwhile
            table.write(index, list(rows))
            with self.lock:
                self.written.append(index)
                self.alive = [ref for ref in self.alive if ref() is not None]
                self.most_alive = max(self.most_alive, len(self.alive))
        return write


WATCH = Watch()


def watched_squares(index: int, size: int, fail_on: int | None = None) -> Rows:
    """`squares` with the test's `WATCH` counting it (threads engine: one process)."""
    with WATCH.lock:
        WATCH.started.append(index)
        WATCH.most_unwritten = max(WATCH.most_unwritten, len(WATCH.started) - len(WATCH.written))
    if index == fail_on:
        raise RuntimeError(f"shard {index} failed")
    rows = Rows({"x": x, "square": x * x} for x in range(index * size, (index + 1) * size))
    with WATCH.lock:
        WATCH.alive.append(weakref.ref(rows))
    return rows


@pytest.fixture
def watch():
    global WATCH
    WATCH = Watch()
    return WATCH


def test_shards_in_flight_and_results_held_stay_within_the_window(prefect_server, tmp_path, watch):
    """24 fast shards, a slow writer: only `max_in_flight` shards are submitted and unwritten at once, and a
    written shard's result is freed, so the stage holds a bounded window of results, not every shard's."""
    config = ScaleOutConfig(engine="threads", workers=2)
    assert config.max_in_flight == 4
    table = ShardedTable(tmp_path / "window")
    counts = map_shards(watched_squares, 24, table, config, name="window", progress=False,
                        write=watch.write(table), size=SHARD)
    assert counts == {"shards_computed": 24, "shards_reused": 0, "rows_written": 24 * SHARD}
    assert sorted(watch.written) == list(range(24)) and table.done() == set(range(24))
    assert rows_of(table) == expected(24)
    assert watch.most_unwritten <= config.max_in_flight
    assert watch.most_alive <= config.max_in_flight
    assert not [ref for ref in watch.alive if ref() is not None]  # nothing kept once the stage returns


def test_a_failed_shard_stops_submission_and_the_submitted_shards_are_written(prefect_server, tmp_path, watch):
    """One worker, a window of 2: shards 0 and 1 start; 0's write submits 2; 1 fails, so nothing after 2 is
    submitted, 2 is still awaited and written, then 1's error is raised. A rerun computes the rest."""
    config = ScaleOutConfig(engine="threads", workers=1)
    table = ShardedTable(tmp_path / "fail")
    with pytest.raises(RuntimeError, match="shard 1 failed"):
        map_shards(watched_squares, 10, table, config, name="fail", progress=False, write=watch.write(table),
                   size=SHARD, fail_on=1)
    assert sorted(watch.started) == [0, 1, 2]
    assert table.done() == {0, 2}
    counts = map_shards(watched_squares, 10, table, config, name="fail", progress=False, size=SHARD)
    assert counts == {"shards_computed": 8, "shards_reused": 2, "rows_written": 8 * SHARD}
    assert rows_of(table) == expected(10)


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


def records_slice(n: int):
    from configs.schema import DataConfig
    from tasks.data import prepare_records
    from tests.conftest import DATA

    return prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=n))


def dask_then_in_process(stage, local_config, dask, read):
    """Run `stage(config)` with `scale_out` on the Dask cluster (in a flow), read it, delete it, run it in-process.

    Returns (Dask result read, in-process result read, shard task-run names). Both runs must share one stage
    folder: the runner is not part of what a stage computes (without the delete the second run would reuse it).
    """
    import shutil

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    @flow
    def on_dask():
        return stage(local_config.model_copy(update={"scale_out": dask}))

    state = on_dask(return_state=True)
    out = state.result()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[state.state_details.flow_run_id])))
    from_dask = read(out)
    shutil.rmtree(out.path)
    in_process = stage(local_config)
    assert in_process.path == out.path
    return from_dask, read(in_process), sorted(r.name for r in runs)


def test_scoring_stage_on_a_dask_cluster_equals_the_in_process_stage(prefect_server, dask_running, tiny_model_dir):
    """`scoring.scale_out` moves the score shards onto Dask worker processes; the table and the stage key stay."""
    from configs.ifd import ScoringConfig
    from configs.schema import ModelConfig
    from tasks.score import read_scores, score_records

    records = records_slice(12)
    local = ScoringConfig(scorer=ModelConfig(name_or_path=str(tiny_model_dir)), max_length=256, shard_size=4)
    on_dask, in_process, shard_runs = dask_then_in_process(
        lambda config: score_records(records, config, progress=False), local, dask_running, read_scores)
    assert shard_runs == ["score-shard-00000", "score-shard-00001", "score-shard-00002"]
    assert len(on_dask) == 12 and all(r["status"] == "scored" for r in on_dask)
    assert in_process == on_dask


def test_generation_stage_on_a_dask_cluster_equals_the_in_process_stage(prefect_server, dask_running):
    """`generator.scale_out` moves the generation shards onto Dask workers; same rows, same stage key."""
    from configs.grape import GeneratorConfig, SamplingConfig
    from configs.schema import ModelConfig
    from tasks.generate import generate_candidates
    from tasks.store import ShardedTable

    records = records_slice(6)
    local = GeneratorConfig(name="tiny-1", model=ModelConfig(name_or_path="tiny:1"),
                            sampling=SamplingConfig(max_new_tokens=6, temperature=0), batch_size=3)
    on_dask, in_process, shard_runs = dask_then_in_process(
        lambda config: generate_candidates(records, config, shard_size=3, progress=False), local, dask_running,
        lambda out: ShardedTable(out.file("shards")).read())
    assert shard_runs == ["generate-tiny-1-shard-00000", "generate-tiny-1-shard-00001"]
    assert len(on_dask) == 6 and all(r["generator"] == "tiny-1" for r in on_dask)
    assert in_process == on_dask


def test_deita_embedding_stage_on_a_dask_cluster_equals_the_in_process_stage(prefect_server, dask_running,
                                                                             tiny_model_dir):
    import numpy as np

    from configs.deita import DeitaEmbeddingConfig
    from configs.schema import ModelConfig
    from tasks.deita import embed_records

    records = records_slice(10)
    local = DeitaEmbeddingConfig(model=ModelConfig(name_or_path=str(tiny_model_dir)), max_length=128, shard_size=4)
    on_dask, in_process, shard_runs = dask_then_in_process(
        lambda config: embed_records(records, config, progress=False), local, dask_running,
        lambda out: np.load(out.file("embeddings.npy")))
    assert len(shard_runs) == 3
    assert on_dask.shape == (10, 64) and np.allclose(np.linalg.norm(on_dask, axis=1), 1, atol=1e-5)
    assert np.allclose(in_process, on_dask, atol=1e-6)  # worker processes run 1 thread: other summation order


def test_deita_scoring_stage_on_a_dask_cluster_equals_the_in_process_stage(prefect_server, dask_running,
                                                                           tiny_model_dir):
    from configs.deita import DeitaScorerConfig
    from configs.schema import ModelConfig
    from tasks.data import read_jsonl
    from tasks.deita import score_complexity

    records = records_slice(9)
    local = DeitaScorerConfig(model=ModelConfig(name_or_path=str(tiny_model_dir)), shard_size=4)
    on_dask, in_process, shard_runs = dask_then_in_process(
        lambda config: score_complexity(records, config), local, dask_running,
        lambda out: read_jsonl(out.file("scores.jsonl")))
    assert len(shard_runs) == 3
    assert len(on_dask) == 9 and all(1 <= s <= 6 for r in on_dask for s in r["scores"])
    assert [r["id"] for r in in_process] == [r["id"] for r in on_dask]
    assert all(abs(a - b) < 1e-5 for x, y in zip(in_process, on_dask) for a, b in zip(x["scores"], y["scores"]))


def test_cherry_instruction_profile_on_a_dask_cluster_equals_the_in_process_stage(prefect_server, dask_running,
                                                                                  tiny_model_dir):
    import numpy as np

    from configs.ifd import PreExperienceConfig, ScoringConfig
    from configs.schema import ModelConfig
    from tasks.data import read_jsonl
    from tasks.ifd import instruction_profile

    records = records_slice(9)
    local = ScoringConfig(scorer=ModelConfig(name_or_path=str(tiny_model_dir)), max_length=256, shard_size=4)
    on_dask, in_process, shard_runs = dask_then_in_process(
        lambda config: instruction_profile(records, config, PreExperienceConfig(), progress=False), local, dask_running,
        lambda out: (read_jsonl(out.file("perplexity.jsonl")), np.load(out.file("embeddings.npy"))))
    assert shard_runs == ["cherry-instructions-shard-00000", "cherry-instructions-shard-00001",
                          "cherry-instructions-shard-00002"]
    assert [r["id"] for r in on_dask[0]] == [r["id"] for r in in_process[0]] and len(on_dask[0]) == 9
    assert np.allclose([r["perplexity"] for r in on_dask[0]], [r["perplexity"] for r in in_process[0]], rtol=1e-5)
    assert on_dask[1].shape == (9, 64) and np.allclose(on_dask[1], in_process[1], atol=1e-5)


def test_an_interrupt_of_the_submitter_interrupts_its_running_worker_threads():
    """Ctrl-C reaches the main thread only: `interrupting_workers` raises `Interrupted` in the worker threads
    running an `interruptible()` body (at their next Python instruction), and a body that starts afterwards ends at
    once; a plain exception of the submitter leaves them running."""
    import contextvars

    from tasks.runner import Interrupted, interruptible, interrupting_workers

    outcomes: dict[str, str] = {}
    inside = threading.Event()

    def body(name: str, seconds: float) -> None:
        try:
            with interruptible():
                inside.set()
                end = time.monotonic() + seconds
                while time.monotonic() < end:  # computing, in Python
                    time.sleep(0.01)
            outcomes[name] = "finished"
        except Interrupted:
            outcomes[name] = "interrupted"

    def submit(name: str, seconds: float) -> threading.Thread:
        context = contextvars.copy_context()  # as Prefect's ThreadPoolTaskRunner submits a task run
        thread = threading.Thread(target=context.run, args=(body, name, seconds))
        thread.start()
        return thread

    with pytest.raises(RuntimeError):
        with interrupting_workers("test"):
            plain = submit("plain", 0.5)
            assert inside.wait(10)
            raise RuntimeError("a plain error")
    plain.join()
    inside.clear()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with interrupting_workers("test"):
            running = submit("running", 60)
            assert inside.wait(10)
            raise KeyboardInterrupt
    running.join(10)
    assert not running.is_alive() and time.monotonic() - started < 10
    with pytest.raises(KeyboardInterrupt):
        with interrupting_workers("test"):
            queued = contextvars.copy_context()  # submitted, but no pool thread has taken it yet
            raise KeyboardInterrupt
    queued.run(body, "queued", 60)  # a pool thread freed by the interrupt takes it: it ends as it starts
    assert outcomes == {"plain": "finished", "running": "interrupted", "queued": "interrupted"}


SPUN: dict[int, str] = {}


def spinning_squares(index: int, size: int, seconds: float) -> list[dict]:
    """`squares` after `seconds` of computing in Python (a real shard: scoring, generating); notes how it ended."""
    from tasks.runner import Interrupted

    SPUN[index] = "started"
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sum(range(1000))
    except Interrupted:
        SPUN[index] = "interrupted"
        raise
    SPUN[index] = "finished"
    return squares(index, size)


def test_an_interrupted_stage_interrupts_its_running_shard_threads(prefect_server, tmp_path):
    """Ctrl-C while shards compute on the threads engine: the running shards are interrupted (their results would
    be dropped anyway), not waited for, and the queued ones never start; a rerun computes every shard."""
    import _thread

    SPUN.clear()
    table = ShardedTable(tmp_path / "interrupted")
    config = ScaleOutConfig(engine="threads", workers=2)

    def ctrl_c_once_two_shards_run():
        deadline = time.monotonic() + 60
        while len(SPUN) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        _thread.interrupt_main()  # as SIGINT does: a KeyboardInterrupt in the main thread (this test's)

    # Ctrl-C handled as in a terminal: a suite started in the background by a non-interactive shell inherits SIGINT
    # ignored, and interrupt_main then does nothing (the stage ran its 6 shards to the end and the test failed)
    found = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=ctrl_c_once_two_shards_run, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            map_shards(spinning_squares, 6, table, config, name="interrupted", progress=False, size=SHARD,
                       seconds=120)
    finally:
        signal.signal(signal.SIGINT, found)
    assert time.monotonic() - started < 60  # before: the two running shards' 120 s
    assert SPUN == {0: "interrupted", 1: "interrupted"} and table.done() == set()
    counts = map_shards(spinning_squares, 6, table, config, name="interrupted", progress=False, size=SHARD, seconds=0)
    assert counts == {"shards_computed": 6, "shards_reused": 0, "rows_written": 6 * SHARD}
    assert rows_of(table) == expected(6)
