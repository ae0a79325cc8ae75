"""Content-addressed stage folders, cache keys and resumable shards."""

from __future__ import annotations

import json
import time

import pytest

from configs.schema import DataConfig
from configs.selection import RandomSelection
from tasks.store import (SUCCESS, ShardedTable, StageOutput, content_digest, file_digest, rows_by_shard, run_stage,
                         stage_cache_key, stage_key, stage_task)


def test_stage_key_depends_on_config_inputs_and_nothing_else():
    a = stage_key("select", RandomSelection(budget=5), ["d1"])
    assert a == stage_key("select", RandomSelection(budget=5, seed=0), ["d1"])
    assert a != stage_key("select", RandomSelection(budget=6), ["d1"])
    assert a != stage_key("select", RandomSelection(budget=5), ["d2"])
    assert a != stage_key("other", RandomSelection(budget=5), ["d1"])


def test_an_auto_device_or_dtype_enters_keys_as_this_machine_resolves_it(monkeypatch):
    import torch

    from configs.schema import ModelConfig

    def keys(cuda: bool) -> tuple[str, str, str]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        return (stage_key("score", ModelConfig(name_or_path="m")),
                stage_key("score", ModelConfig(name_or_path="m", device="cpu")),
                stage_key("score", ModelConfig(name_or_path="m", device="cpu", dtype="float32")))

    on_cpu, on_gpu = keys(cuda=False), keys(cuda=True)
    assert on_cpu[0] != on_gpu[0]  # float32 scores on a CPU are not bfloat16 scores on CUDA
    assert on_cpu[1:] == on_gpu[1:]  # a pinned device means the same wherever the key is computed
    assert on_cpu[1] != on_cpu[2]  # ... though spelling out its dtype is another config
    from tasks.store import canonical

    assert canonical(ModelConfig(name_or_path="m"))["auto_resolves_to"] == "cuda/bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a flow process without CUDA, its workers with
    assert canonical(ModelConfig(name_or_path="m", device="cuda"))["auto_resolves_to"] == "cuda/bfloat16"
    assert "auto_resolves_to" not in canonical(ModelConfig(name_or_path="m", device="cpu", dtype="float32"))


def test_run_stage_runs_once_then_reuses(tmp_path):
    calls = []

    def body(folder):
        calls.append(folder)
        (folder / "out.txt").write_text("hello")
        time.sleep(0.05)
        return {"metrics": {"n": 1.0}}

    first = run_stage("unit-test", {"x": 1}, [], body)
    second = run_stage("unit-test", {"x": 1}, [], body)
    assert len(calls) == 1 and first == second.model_copy(update={"reused": False})
    assert 0.05 <= first.seconds < 5 and second.seconds == first.seconds  # the recorded run's wall time
    assert not first.reused and second.reused  # the flow tags the second call's MLflow run as cached
    assert (first.file(SUCCESS)).exists() and first.digest == file_digest(first.path)
    third = run_stage("unit-test", {"x": 2}, [], body)
    assert len(calls) == 2 and third.path != first.path


def test_failed_stage_leaves_no_success_marker():
    def body(folder):
        (folder / "partial.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage("unit-test-fail", {}, [], body)
    out = []
    run_stage("unit-test-fail", {}, [], lambda f: out.append(f) or {})
    assert len(out) == 1  # the rerun ran again instead of trusting a half-written folder


def test_cache_key_ignores_where_to_report_and_follows_file_content(tmp_path):
    data = tmp_path / "d.json"
    data.write_text("[]")
    cfg = DataConfig(path=str(data))
    k1 = stage_cache_key(None, {"data": cfg, "parent_run_id": "run-a"})
    assert k1 == stage_cache_key(None, {"data": cfg, "parent_run_id": "run-b"})
    data.write_text("[ ]")
    assert k1 != stage_cache_key(None, {"data": cfg, "parent_run_id": "run-a"})


def test_cache_key_follows_every_file_the_parameters_name(tmp_path):
    # Prefect hands back a cached result without running the stage, so a file the stage reads by a plain path
    # (a candidates file, a nested data config, a model folder) must move the key when it changes.
    from configs.grape import CandidatesFile, GrapeSelection
    from configs.schema import ModelConfig

    cands = tmp_path / "cands.json"
    cands.write_text('{"data": []}')
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    selection = GrapeSelection(target=ModelConfig(name_or_path=str(model)), candidates=CandidatesFile(path=str(cands)))
    nested = {"eval": {"held_out": DataConfig(path=str(cands))}}
    keys = [stage_cache_key(None, {"selection": selection}), stage_cache_key(None, nested)]
    cands.write_text('{"data": [1]}')
    keys_edited = [stage_cache_key(None, {"selection": selection}), stage_cache_key(None, nested)]
    assert keys[0] != keys_edited[0] and keys[1] != keys_edited[1]
    (model / "model.safetensors").write_bytes(b"weights")  # a model folder retrained in place
    assert stage_cache_key(None, {"selection": selection}) != keys_edited[0]
    # strings that name no file (model names, labels) leave the key alone
    from tasks.store import canonical, file_fingerprints

    plain = {"model": ModelConfig(name_or_path="tiny:0"), "label": "x"}
    assert file_fingerprints(canonical(plain)) == {}


def test_a_stage_reruns_when_a_file_its_config_names_changes(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    calls = []

    def body(folder):
        calls.append(folder)
        return {}

    config = {"scorer": {"name_or_path": str(model)}}
    first = run_stage("unit-test-files", config, [], body)
    assert run_stage("unit-test-files", config, [], body).reused and len(calls) == 1
    (model / "model.safetensors").write_bytes(b"retrained in place")
    again = run_stage("unit-test-files", config, [], body)
    assert len(calls) == 2 and again.path != first.path and not again.reused
    # each folder says what its key was made of: the file change is there to read
    made_of = [json.loads(out.file("stage_key.json").read_text()) for out in (first, again)]
    assert [m["key"] for m in made_of] == [first.key, again.key]
    assert made_of[0]["config"]["config"] == made_of[1]["config"]["config"] == config
    assert made_of[0]["config"]["files"] != made_of[1]["config"]["files"]


def test_runtime_only_fields_stay_out_of_keys_at_any_depth():
    from configs.ifd import CherrySelection, ScoringConfig
    from configs.runner import ScaleOutConfig
    from configs.schema import ModelConfig

    def cherry(scale_out=None, max_length=512):
        return CherrySelection(budget=5, scoring=ScoringConfig(scorer=ModelConfig(name_or_path="tiny:0"),
                                                               max_length=max_length, scale_out=scale_out))

    base = stage_cache_key(None, {"selection": cherry()})
    assert base == stage_cache_key(None, {"selection": cherry(ScaleOutConfig(workers=2))})
    assert base != stage_cache_key(None, {"selection": cherry(max_length=256)})
    assert stage_key("s", cherry()) == stage_key("s", cherry(ScaleOutConfig(workers=2)))


def test_upstream_outputs_enter_keys_by_digest():
    up = StageOutput(stage="s", key="k", path="/nowhere", digest="abc")
    moved = up.model_copy(update={"path": "/elsewhere"})
    assert content_digest([up]) == content_digest([moved])
    assert content_digest([up]) != content_digest([up.model_copy(update={"digest": "abd"})])


def test_sharded_table_resumes_and_reads_in_order(tmp_path):
    table = ShardedTable(tmp_path / "scores")
    table.write(1, [{"i": 2}, {"i": 3}])
    table.write(0, [{"i": 0}, {"i": 1}])
    assert table.done() == {0, 1}
    again = ShardedTable(tmp_path / "scores")
    assert again.done() == {0, 1} and [r["i"] for r in again.read()] == [0, 1, 2, 3]
    assert not list((tmp_path / "scores").glob(".*tmp*"))


def test_a_damaged_shard_is_computed_again_on_resume_and_never_read_as_data(tmp_path):
    """Resume trusts a shard only while its file matches the sha256 in the manifest; reading a stage's table
    with a damaged shard is an error naming it, not fake scores used silently."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from configs.errors import StoreCorrupt

    table = ShardedTable(tmp_path / "scores")
    for index in range(3):
        table.write(index, [{"i": index}])
    pq.write_table(pa.Table.from_pylist([{"i": 99}]), table.shard_path(1))  # valid parquet, other content
    table.shard_path(2).unlink()
    with pytest.raises(StoreCorrupt, match="part-00001.parquet does not match.*part-00002.parquet is missing"):
        table.read()
    assert table.done() == {0}
    calls = []
    rows = rows_by_shard(tmp_path / "scores", 3, 1, lambda a, b: calls.append(a) or [{"i": a}], "t", progress=False)
    assert calls == [1, 2] and [r["i"] for r in rows] == [0, 1, 2]


def test_a_resume_checks_the_manifest_once_not_once_per_shard(tmp_path, monkeypatch):
    """Finding the shards left to compute hashes every recorded shard: once per resume, not once per shard (that
    was quadratic in the shard count)."""
    for index in range(4):
        ShardedTable(tmp_path / "t").write(index, [{"i": index}])
    checks = []
    real_check = ShardedTable.check
    monkeypatch.setattr(ShardedTable, "check", lambda self: checks.append(1) or real_check(self))
    rows = rows_by_shard(tmp_path / "t", 12, 1, lambda a, b: [{"i": a}], "t", progress=False)
    assert [r["i"] for r in rows] == list(range(12))
    assert len(checks) == 2  # the resume's todo list, then the final read
    checks.clear()
    assert ShardedTable(tmp_path / "t").todo(14) == [12, 13] and len(checks) == 1


MODULE_GLOBAL = 3


def _reads_a_global():
    return MODULE_GLOBAL


def test_stage_tasks_leave_stdout_capture_to_the_libraries_that_do_it(prefect_server):
    """dill (under datasets' fingerprinting) finds a function's globals by capturing dis.dis's printout; with the
    flow's log_prints reaching into a stage, that printout went to the run log instead and dill found nothing."""
    from prefect import flow

    def finds_globals(tag):
        def body(folder):
            import dill.detect

            return {"metrics": {"globals": len(dill.detect.globalvars(_reads_a_global))}}
        return run_stage("finds-globals", {"tag": tag}, [], body)

    finds_globals_task = stage_task(finds_globals, name="finds-globals")

    @flow(log_prints=True)
    def printing_flow():
        return finds_globals_task("log-prints")

    assert printing_flow().metrics["globals"] == 1


def test_selection_stages_preview_their_first_samples_for_the_prefect_artifact():
    from tasks.data import prepare_records
    from tasks.select import baseline_selection
    from tasks.track import selection_preview
    from tests.conftest import DATA

    records = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=8))
    subset = baseline_selection(records, RandomSelection(budget=6, seed=0), "alpaca")
    preview = selection_preview(subset, rows=3, width=40).splitlines()
    assert preview[2] == "| # | instruction | response |" and len(preview) == 4 + 3 + 1  # 3 rows, blank line
    assert preview[4].startswith("| 1 | ") and all(len(cell) <= 42 for cell in preview[4].split("|"))
    assert selection_preview(records) == ""  # not a selection stage


def _count_words(data: DataConfig, batch_size: int) -> StageOutput:
    # batch_size changes no result, so the stage leaves it out of its store key (as the Deita scorers do)
    def body(folder):
        words = len(open(data.path).read().split())
        (folder / "count.txt").write_text(str(words))
        return {"metrics": {"words": float(words)}}

    return run_stage("count-words", {"data": data}, [file_digest(data.path)], body)


def test_a_stage_found_finished_in_the_store_is_logged_as_cached(prefect_server, tmp_path):
    # Prefect's key sees batch_size, the store's does not: the second call misses Prefect's cache, runs the task,
    # and the task returns the finished folder. Its MLflow run must say cached, not claim a fresh computation.
    from prefect import flow

    from flows.wiring import run_stage_task
    from tasks.track import client, start_parent_run

    data = tmp_path / "words.txt"
    data.write_text("one two three")
    count_task = stage_task(_count_words, name="count-words")

    @flow
    def count_twice(parent: str):
        first = run_stage_task(count_task, DataConfig(path=str(data)), 4, parent_run_id=parent)
        second = run_stage_task(count_task, DataConfig(path=str(data)), 8, parent_run_id=parent)
        return first, second

    parent = start_parent_run("store-reuse-test", "twice", DataConfig(path=str(data)), None)
    first, second = count_twice(parent)
    assert first.path == second.path and first.metrics == {"words": 3.0}
    runs = client().search_runs([client().get_experiment_by_name("store-reuse-test").experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["pomona.cached"] for r in runs) == ["false", "true"]
    assert all("stage_seconds" in r.data.metrics for r in runs)
    logged = {a.path for a in client().list_artifacts(runs[0].info.run_id)}
    assert "stage_key.json" in logged  # what the key was made of, next to the stage's own artifacts


def test_tracking_steps_are_tasks_and_helpers_are_plain_functions():
    # the Prefect UI lists start/log/finish as task runs of a flow; a helper decorated by mistake would add task runs
    from prefect import Task

    from tasks import track

    assert all(isinstance(getattr(track, name), Task) for name in ("start_tracking", "log_stage", "finish_tracking"))
    assert not any(isinstance(getattr(track, name), Task) for name in ("artifact_key", "log_stage_run", "start_parent_run"))


def test_shards_written_from_many_threads_all_reach_the_manifest(tmp_path):
    # scale-out writes shards from worker threads, and two runs of one stage may share its folder: the manifest's
    # read-modify-write and the temp files must not collide (before the lock, entries were lost or files clashed)
    import threading

    table = ShardedTable(tmp_path / "shards")
    errors = []

    def writer(k):
        try:
            for i in range(k * 10, (k + 1) * 10):
                table.write(i, [{"i": i}])
        except Exception as exc:  # noqa: BLE001 - collected to fail the test below with the error itself
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and table.done() == set(range(80))
    assert [r["i"] for r in table.read()] == list(range(80))


def test_code_version_follows_every_edit_of_the_stage_code(tmp_path):
    """Stage keys include a digest of configs/, models/ and tasks/: an edited template string (or any stage code)
    is a new key, where a hand-bumped constant let old folders be reused after such changes."""
    from configs.settings import CODE_VERSION, release, source_digest

    for package in ("configs", "models", "tasks", "flows"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("X = 1\n")
    before = source_digest(tmp_path)
    (tmp_path / "flows" / "a.py").write_text("X = 2\n")  # flows only wire stages: not part of the version
    assert source_digest(tmp_path) == before
    (tmp_path / "models" / "a.py").write_text("X = 2\n")
    assert source_digest(tmp_path) != before
    (tmp_path / "models" / "a.py").write_text("X = 1\n")
    (tmp_path / "tasks" / "b.py").write_text("")  # a new file counts too
    assert source_digest(tmp_path) != before
    assert CODE_VERSION.startswith("src-") and "torch=" in CODE_VERSION and "trl=" in CODE_VERSION
    assert "+" not in CODE_VERSION  # torch 2.13.0+cpu and 2.13.0+cu128 workers share one store
    assert release("2.13.0+cu128") == release("2.13.0+cpu") == "2.13.0" and release("4.57.1") == "4.57.1"


def test_code_version_follows_the_deepspeed_and_accelerate_files_training_reads(tmp_path):
    """A training stage's key names its DeepSpeed stage ('zero2'), not the file: the JSON and accelerate YAML that
    say what 'zero2' means are stage code (an edit changes the trained model), so they are in the version too."""
    from configs.settings import source_digest

    for folder in ("configs/deepspeed", "configs/accelerate", "configs/recipes", "configs/eval_tasks"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "configs" / "a.py").write_text("X = 1\n")
    (tmp_path / "configs" / "deepspeed" / "zero2.json").write_text('{"gradient_clipping": 1.0}')
    (tmp_path / "configs" / "accelerate" / "deepspeed_zero2.yaml").write_text("mixed_precision: 'no'\n")
    before = source_digest(tmp_path)
    (tmp_path / "configs" / "recipes" / "r.yaml").write_text("name: r\n")  # a user's recipe is no stage code
    (tmp_path / "configs" / "eval_tasks" / "t.yaml").write_text("task: t\n")  # keyed by the lm-eval stage itself
    assert source_digest(tmp_path) == before
    (tmp_path / "configs" / "deepspeed" / "zero2.json").write_text('{"gradient_clipping": 0.5}')
    edited = source_digest(tmp_path)
    assert edited != before
    (tmp_path / "configs" / "accelerate" / "deepspeed_zero2.yaml").write_text("mixed_precision: bf16\n")
    assert source_digest(tmp_path) not in (before, edited)


def test_a_second_run_of_a_stage_waits_for_the_first_and_reuses_its_output():
    """Two runs computing the same stage at once (two processes, or parallel comparison branches) must not train
    or score into one folder together: the second waits on the stage lock, then finds the folder finished."""
    import threading

    calls, started = [], threading.Event()

    def body(folder):
        calls.append(folder)
        started.set()
        time.sleep(0.5)
        (folder / "out.txt").write_text("once")
        return {}

    outs = []
    first = threading.Thread(target=lambda: outs.append(run_stage("unit-test-lock", {"x": 1}, [], body)))
    first.start()
    started.wait(5)
    second = run_stage("unit-test-lock", {"x": 1}, [], body)  # blocks until the first finished
    first.join()
    assert len(calls) == 1
    assert second.reused and not outs[0].reused and second.digest == outs[0].digest


def test_a_moved_home_still_serves_its_finished_stages(tmp_path, monkeypatch):
    """Keys name store folders relative to the store (their content enters by digest), and a finished folder
    reports where it is now: moving POMONA_HOME (or mounting it elsewhere in compose) reuses everything."""
    import shutil

    from configs.settings import store_root
    from flows.wiring import still_in_store

    monkeypatch.setenv("POMONA_HOME", str(tmp_path / "a"))
    model = store_root() / "train-sft" / "k1" / "model"
    model.mkdir(parents=True)
    calls = []
    config = {"model": str(model), "n": 1}
    first = run_stage("unit-test-move", config, [], lambda f: calls.append(f) or {})
    assert still_in_store(first)
    key_file = json.loads(first.file("stage_key.json").read_text())
    assert key_file["config"] == {"model": "<store>/train-sft/k1/model", "n": 1}  # no fingerprint of a store folder

    shutil.move(tmp_path / "a", tmp_path / "b")
    monkeypatch.setenv("POMONA_HOME", str(tmp_path / "b"))
    again = run_stage("unit-test-move", {"model": str(store_root() / "train-sft" / "k1" / "model"), "n": 1}, [],
                      lambda f: calls.append(f) or {})
    assert len(calls) == 1 and again.reused and again.key == first.key
    assert again.path == str(tmp_path / "b" / "store" / "unit-test-move" / first.key)
    assert not still_in_store(first)  # the old path (what Prefect's cache would hand back) is not this home's
    assert still_in_store(again)


def test_mlflow_params_keep_legal_names_and_say_when_they_are_cut():
    from tasks.track import MAX_PARAM_CHARS, TRUNCATED, flatten

    params = flatten({"candidates": {"generator_labels": {"gpt-4 (0613)": "gpt4"}}, "methods": ["x" * 7000]})
    assert params["candidates.generator_labels.gpt-4 _0613_"] == "gpt4"  # MLflow refuses ( ) in names
    assert len(params["methods"]) == MAX_PARAM_CHARS and params["methods"].endswith(TRUNCATED)


def test_a_stage_run_whose_logging_fails_ends_failed_and_a_missing_run_is_none(tmp_path):
    """No child run left RUNNING forever; a training stage finished under another tracking store (its run id
    unknown here) is logged as a new cached run instead of crashing the rerun."""
    from tasks.track import client, log_stage_run, start_parent_run, tracked_run_or_none

    parent = start_parent_run("unit-test-tracking", "p", DataConfig(path="x.json"), None)
    out = StageOutput(stage="unit", key="k", path=str(tmp_path), digest="d",
                      datasets=[{"name": "n", "file": "missing.jsonl"}])
    with pytest.raises(FileNotFoundError):
        log_stage_run(parent, out)
    runs = client().search_runs([client().get_run(parent).info.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert tracked_run_or_none(runs[0].info.run_id).info.run_id == runs[0].info.run_id
    assert tracked_run_or_none("0" * 32) is None


def test_stage_key_changes_with_the_code_version(monkeypatch):
    """Outputs of other code are never reused: the same stage, config and inputs under another CODE_VERSION (an
    edited template, a library upgrade) is another key, and so another Prefect cache key."""
    import tasks.store

    config, inputs = RandomSelection(budget=5), ["d1"]
    before = stage_key("select", config, inputs)
    cache_before = stage_cache_key(None, {"selection": config})
    monkeypatch.setattr(tasks.store, "CODE_VERSION", tasks.store.CODE_VERSION + "-edited")
    assert stage_key("select", config, inputs) != before
    assert stage_cache_key(None, {"selection": config}) != cache_before
    monkeypatch.undo()
    assert stage_key("select", config, inputs) == before


def test_a_sharded_table_reads_as_one_dataset_when_a_column_is_null_in_one_shard(tmp_path):
    """Every shard has the table's one schema: a column null (or absent, or an empty shard) in one shard and
    filled in another reads back through pyarrow.dataset and pandas on the shard folder, not a schema-merge error
    (nor the manifest read as a shard)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as ds

    table = ShardedTable(tmp_path / "scores")
    table.write(0, [{"i": 0, "reason": None, "nll": None, "scores": []}])
    table.write(2, [])
    table.write(1, [{"i": 1, "reason": "too long", "nll": 1.5, "scores": [0.5]}, {"i": 2, "extra": True}])
    rows = [{"i": 0, "reason": None, "nll": None, "scores": [], "extra": None},
            {"i": 1, "reason": "too long", "nll": 1.5, "scores": [0.5], "extra": None},
            {"i": 2, "reason": None, "nll": None, "scores": None, "extra": True}]
    got = ds.dataset(tmp_path / "scores").to_table()
    assert got.schema.field("reason").type == pa.string() and got.schema.field("nll").type == pa.float64()
    assert sorted(got.to_pylist(), key=lambda r: r["i"]) == rows
    frame = pd.read_parquet(tmp_path / "scores")
    assert sorted(frame["i"].tolist()) == [0, 1, 2] and set(frame["reason"].dropna()) == {"too long"}
    assert table.read() == rows and table.done() == {0, 1, 2}


def test_shards_of_an_older_version_resume_and_end_in_one_schema(tmp_path):
    """A partial stage written before tables kept one schema (legacy manifest name, a null-typed column, one
    shard conflicting outright) resumes: its shards are adopted into one schema, the conflicting one is computed
    again, and the folder then reads as one dataset."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    folder = tmp_path / "scores"
    folder.mkdir()
    old = {0: [{"i": 0, "reason": None}], 1: [{"i": 1, "reason": "x"}], 2: [{"i": 2, "reason": 7}]}
    for index, rows in old.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{index:05d}.parquet")
    (folder / "part-manifest.json").write_text(json.dumps({"shards": {
        str(i): {"rows": 1, "sha256": file_digest(folder / f"part-{i:05d}.parquet")} for i in old}}))
    calls = []
    rows = rows_by_shard(folder, 4, 1, lambda a, b: calls.append(a) or [{"i": a, "reason": f"r{a}"}], "t",
                         progress=False)
    assert calls == [2, 3] and rows == [{"i": 0, "reason": None}, {"i": 1, "reason": "x"},
                                         {"i": 2, "reason": "r2"}, {"i": 3, "reason": "r3"}]
    assert not (folder / "part-manifest.json").exists() and (folder / "_part-manifest.json").exists()
    assert sorted(ds.dataset(folder).to_table().to_pylist(), key=lambda r: r["i"]) == rows
    assert ShardedTable(folder).todo(4) == []


def test_cache_key_follows_a_folder_named_relative_to_the_repository(tmp_path, monkeypatch):
    # lm-eval task folders and instruction test sets resolve against the repository root when the run's folder
    # lacks them (`repo_path`): Prefect must not hand back a cached evaluation after such a file was edited.
    import configs.schema
    from configs.evaluate import InstructionEvalConfig, LmEvalConfig

    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    (repo / "my_tasks").mkdir(parents=True)
    (repo / "my_sets").mkdir()
    elsewhere.mkdir()
    task_file, set_file = repo / "my_tasks" / "t.yaml", repo / "my_sets" / "vicuna_test_set.jsonl"
    task_file.write_text("task: t\n")
    set_file.write_text('{"text": "q"}\n')
    monkeypatch.setattr(configs.schema, "REPO_ROOT", repo)
    monkeypatch.chdir(elsewhere)
    params = {"cfg": LmEvalConfig(task_dir="my_tasks"),
              "inst": InstructionEvalConfig(data_dir="my_sets", pairwise=False)}
    before = stage_cache_key(None, params)
    task_file.write_text("task: t\nnum_fewshot: 5\n")
    edited_task = stage_cache_key(None, params)
    set_file.write_text('{"text": "another question"}\n')
    assert len({before, edited_task, stage_cache_key(None, params)}) == 3


def test_cache_key_follows_a_baseline_answers_file_named_relative_to_the_repository(tmp_path, monkeypatch):
    # the judge reads baseline answers by `repo_path` as it reads the test sets: the same file must move its key
    import configs.schema
    from configs.evaluate import BaselineAnswersFile, InstructionEvalConfig
    from configs.schema import missing_input_files

    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    repo.mkdir()
    elsewhere.mkdir()
    answers = repo / "vicuna_two_models.json"
    answers.write_text('{"data": [{"text": "q", "Answer2": "a"}]}')
    monkeypatch.setattr(configs.schema, "REPO_ROOT", repo)
    monkeypatch.chdir(elsewhere)
    inst = InstructionEvalConfig(data_dir=str(repo), baseline_answers={
        "vicuna": BaselineAnswersFile(path="vicuna_two_models.json")})
    assert missing_input_files(inst) == []  # found where the judge finds it
    before = stage_cache_key(None, {"inst": inst})
    answers.write_text('{"data": [{"text": "q", "Answer2": "another answer"}]}')
    assert stage_cache_key(None, {"inst": inst}) != before
