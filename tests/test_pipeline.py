"""The end-to-end pipeline on bundled data: MLflow parent/child runs, dataset inputs, and cached reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs.pipeline import load_recipe
from tests.conftest import DATA, REPO, task_states


@pytest.fixture(scope="module")
def two_runs(prefect_server):
    from flows.pipeline import pipeline

    config = load_recipe(REPO / "configs/recipes/demo.yaml",
                         overrides={"selection.budget": 17, "tracking.experiment": "pipeline-test"})
    first = pipeline(config, return_state=True)
    second = pipeline(config, return_state=True)
    return config, first, second


def test_second_run_reuses_every_stage(two_runs):
    _, first, second = two_runs
    assert first.is_completed() and second.is_completed()
    out1, out2 = first.result(), second.result()
    assert out1["selection"].digest == out2["selection"].digest
    states1 = task_states(first.state_details.flow_run_id)
    states2 = task_states(second.state_details.flow_run_id)
    stages = ["prepare-records", "select-baseline", "train-sft", "eval-lm-eval", "eval-likelihood", "eval-table"]
    assert {s: states1[s] for s in stages} == dict.fromkeys(stages, "Completed")
    assert {s: states2[s] for s in stages} == dict.fromkeys(stages, "Cached")


def test_the_trained_adapter_is_evaluated(two_runs):
    _, first, _ = two_runs
    out = first.result()
    assert set(out) == {"records", "selection", "sft", "evaluation"}
    assert out["sft"].metrics["train.global_step"] == 6
    assert (out["sft"].file("model") / "adapter_config.json").exists()
    metrics = out["evaluation"].metrics
    assert 0 < metrics["likelihood/mean_nll"] < 20
    assert any(k.startswith("lm_eval/pomona_mc") for k in metrics), sorted(metrics)


def test_subset_files_follow_the_budget_in_input_order(two_runs):
    config, first, _ = two_runs
    sel = first.result()["selection"]
    ids = sel.file("selected_ids.txt").read_text().split()
    records = [json.loads(line)["id"] for line in open(first.result()["records"].file("records.jsonl"))]
    assert len(ids) == 17 == len(set(ids))
    assert ids == [i for i in records if i in set(ids)]
    subset = [json.loads(line) for line in open(sel.file("subset.jsonl"))]
    assert set(subset[0]) == {"instruction", "input", "output"}  # the user's Alpaca format
    messages = [json.loads(line) for line in open(sel.file("subset.messages.jsonl"))]
    assert messages[0]["messages"][-1]["role"] == "assistant"


def test_mlflow_holds_parent_children_params_metrics_artifacts_and_dataset(two_runs):
    from tasks.track import client

    config, first, second = two_runs
    mlc = client()
    exp = mlc.get_experiment_by_name("pipeline-test")
    assert exp.artifact_location.startswith("file://")
    runs = mlc.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 2
    assert len(children) == 2 * 6, sorted(c.data.tags["pomona.stage"] for c in children)
    parent = parents[-1]  # the first pipeline run (search_runs lists newest first)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["selection.budget"] == "17"
    assert parent.data.tags["prefect.flow_run_id"] == str(first.state_details.flow_run_id)
    mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    select = next(c for c in mine if c.data.tags["pomona.stage"] == "select-random")
    assert select.data.metrics["selected"] == 17 and select.data.params["budget"] == "17"
    assert select.data.tags["pomona.cached"] == "false"
    artifacts = {a.path for a in mlc.list_artifacts(select.info.run_id)}
    assert {"selected_ids.txt", "subset.jsonl"} <= artifacts
    inputs = select.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "random-subset"
    assert inputs[0].dataset.digest == first.result()["selection"].datasets[0]["digest"]
    assert any(t.value == "training" for t in inputs[0].tags)
    cached = [c for c in children if c.data.tags["mlflow.parentRunId"] != parent.info.run_id]
    assert {c.data.tags["pomona.cached"] for c in cached} == {"true"}
    config_yaml = mlc.download_artifacts(parent.info.run_id, "config.yaml")
    assert "budget: 17" in open(config_yaml).read()
    # the run's headline on both parents (the cached rerun too), named as a comparison's method runs name it
    out = first.result()
    for run in parents:
        assert run.data.metrics["selected"] == 17 and run.data.metrics["short_of_budget"] == 0
        assert run.data.metrics["train_loss"] == pytest.approx(out["sft"].metrics["train.mean_loss"])
        assert run.data.metrics["likelihood/mean_nll"] == pytest.approx(out["evaluation"].metrics["likelihood/mean_nll"])
        assert any(k.startswith("lm_eval/pomona_mc/acc") for k in run.data.metrics)


def test_every_selection_method_is_a_pipeline_option():
    import typing

    from configs.pipeline import SelectionConfig

    union = typing.get_args(SelectionConfig)[0]
    methods = {cls.model_fields["method"].default for cls in typing.get_args(union)}
    assert methods == {"random", "longest", "full", "cherry", "superfilter", "grape", "deita"}


def test_data_is_required_except_for_grape_from_a_candidates_file():
    from configs.pipeline import PipelineConfig

    candidates = {"method": "grape", "target": {"name_or_path": "tiny:0"},
                  "candidates": {"path": str(DATA / "vicuna_two_models_12.json")}}
    assert PipelineConfig.model_validate({"name": "g", "selection": candidates}).data is None
    with pytest.raises(ValueError, match="needs 'data'"):
        PipelineConfig.model_validate({"name": "r", "selection": {"method": "random", "budget": 5}})
    with pytest.raises(ValueError, match="remove 'data'"):
        PipelineConfig.model_validate({"name": "g", "selection": candidates,
                                       "data": {"path": str(DATA / "alpaca_demo_200.json")}})


def test_pipeline_runs_grape_from_a_candidates_file(prefect_server):
    from configs.pipeline import PipelineConfig
    from flows.pipeline import pipeline

    config = PipelineConfig.model_validate({
        "name": "pipeline-grape",
        "selection": {"method": "grape", "target": {"name_or_path": "tiny:0"},
                      "candidates": {"path": str(DATA / "vicuna_two_models_12.json"), "limit": 6}},
        "output_format": "messages"})
    out = pipeline(config)
    assert set(out) == {"selection"}
    rows = [json.loads(line) for line in open(out["selection"].file("subset.jsonl"))]
    assert len(rows) == 6 and all(r["messages"][-1]["role"] == "assistant" for r in rows)


def test_grape_pairs_flow_straight_into_dpo_after_sft(prefect_server):
    # the pipeline's DPO without a pairs file trains on the pairs GRAPE wrote from its fit scores
    from configs.pipeline import PipelineConfig
    from flows.pipeline import pipeline
    from tasks.data import read_jsonl
    from tasks.train import read_train_result

    fast = {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 256, "logging_steps": 1,
            "save_steps": 2, "lora": {"r": 4, "alpha": 8}}
    config = PipelineConfig.model_validate({
        "name": "grape-dpo-test",
        "selection": {"method": "grape", "target": {"name_or_path": "tiny:0"},
                      "candidates": {"path": str(DATA / "vicuna_two_models_12.json")}, "dpo": {"enabled": True}},
        "train": {"model": {"name_or_path": "tiny:0"}, "sft": {**fast, "learning_rate": 1e-3}, "dpo": fast}})
    out = pipeline(config)
    pairs = read_jsonl(out["selection"].file("pairs.jsonl"))
    assert pairs and out["dpo"].metrics["dpo.pairs_read"] == len(pairs)
    result = read_train_result(Path(out["dpo"].path))
    assert result["kind"] == "dpo" and result["global_step"] == 2
    assert out["sft"].path in result["base_model"]  # DPO started from the SFT stage's model


def test_a_stage_folder_deleted_from_the_store_is_recomputed_not_handed_on(two_runs):
    """Prefect's cache outlives the store: a user who deletes a stage folder to free disk gets the stage rerun."""
    import shutil

    from flows.pipeline import pipeline

    config, first, _ = two_runs
    selection = first.result()["selection"]
    shutil.rmtree(selection.path)
    third = pipeline(config.model_copy(update={"tracking": config.tracking.model_copy(update={"enabled": False})}),
                     return_state=True)
    assert third.is_completed()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[third.state_details.flow_run_id])))
    states = sorted((r.name.rsplit("-", 1)[0], r.state.name) for r in runs)
    # Prefect's stale cache hit, then the rerun that recomputes the folder
    assert [s for name, s in states if name == "select-baseline"] == ["Cached", "Completed"]
    assert [s for name, s in states if name == "train-sft"] == ["Cached"]  # the recomputed subset has the same digest: nothing downstream reruns
    assert third.result()["selection"].digest == selection.digest
    assert selection.file("subset.jsonl").exists()


def test_the_run_forms_config_description_names_every_section():
    """Prefect shows the docstring's `config:` line on the run form; it left out `train` and `evaluate`."""
    import re

    from configs.pipeline import PipelineConfig
    from flows.pipeline import pipeline

    described = pipeline.parameters.properties["config"]["description"]
    named = set(re.findall(r"[a-z_]+", described))
    assert set(PipelineConfig.model_fields) <= named, set(PipelineConfig.model_fields) - named


def test_a_fail_at_naming_no_stage_is_refused_before_any_stage_runs(prefect_server):
    """A typo in the test-only `fail_at` used to surface only after every stage had computed."""
    from configs.errors import ConfigError
    from flows.pipeline import pipeline

    config = load_recipe(REPO / "configs/recipes/demo.yaml",
                         overrides={"tracking.enabled": False, "train": None, "evaluate": None,
                                    "selection.budget": 7})
    state = pipeline(config, fail_at="select-baselin", return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError) as refused:
        state.result()
    message = str(refused.value)
    assert "did you mean 'select-baseline'" in message
    assert "prepare-records" in message and "train-sft" in message  # the valid names are listed
    assert task_states(state.state_details.flow_run_id) == {}  # not one stage ran


def test_fail_at_is_checked_against_every_stage_task_name():
    from configs.errors import ConfigError
    from flows.wiring import check_fail_at, fail_at_stage
    from tasks.store import stage_task_names

    names = stage_task_names()
    assert {"prepare-records", "select-baseline", "select-grape", "train-dpo", "eval-table", "compare-table"} <= set(names)
    for name in names:
        check_fail_at(name)
    ran = []
    with pytest.raises(ConfigError, match="matched no stage"):
        with fail_at_stage("no-such-stage"):
            ran.append(True)
    assert not ran


def test_a_selection_left_short_of_its_budget_by_its_filter_is_warned_about(prefect_server, run_log_warnings):
    """Cherry's IFD > 1 rule drops about half of what a random scorer scores: 30 asked of 40 cannot all be kept."""
    from configs.pipeline import PipelineConfig
    from flows.pipeline import pipeline

    warned = run_log_warnings

    config = PipelineConfig.model_validate({
        "name": "pipeline-short-of-budget", "data": {"path": str(DATA / "alpaca_cherry_40.json")},
        "selection": {"method": "cherry", "budget": 30, "pre_experience": None,
                      "scoring": {"scorer": {"name_or_path": "tiny:0"}, "max_length": 256}},
        "tracking": {"enabled": False}})
    selection = pipeline(config)["selection"]
    kept = int(selection.metrics["selected"])
    assert kept == selection.metrics["passing_threshold"] < 30
    assert any(f"cherry kept {kept} samples, {30 - kept} fewer than the 30 asked" in m for m in warned), warned
