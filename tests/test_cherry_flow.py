"""The Cherry and Superfiltering flows on the tiny model: every step a cached stage, a failed step reruns alone,
and MLflow gets the histogram, counts, subset and scorer/template params."""

from __future__ import annotations

import json

from configs.ifd import (CherryFlowConfig, CherrySelection, DiversityConfig, PreExperienceConfig, ScoringConfig,
                         SuperfilterFlowConfig, SuperfilterSelection)
from configs.schema import DataConfig, ModelConfig, TrackingConfig
from configs.train import SFTStageConfig
from tests.conftest import DATA, task_states

DATA_CFG = DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=24)


def _child_runs(experiment):
    from tasks.track import client

    mlc = client()
    exp = mlc.get_experiment_by_name(experiment)
    return mlc, [r for r in mlc.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def test_cherry_flow_failed_sft_reruns_alone_and_logs_ifd(prefect_server):
    from flows.cherry import cherry_flow

    scoring = ScoringConfig(scorer=ModelConfig(name_or_path="tiny:0"), template="wiz", max_length=256, shard_size=8)
    pre = PreExperienceConfig(n_clusters=2, per_cluster=3, n_init=2,
                              sft=SFTStageConfig(max_steps=2, per_device_train_batch_size=2, max_length=128,
                                                 logging_steps=1, register_model=False))
    config = CherryFlowConfig(data=DATA_CFG, selection=CherrySelection(scoring=scoring, pre_experience=pre, share=0.5),
                              tracking=TrackingConfig(experiment="cherry-flow-test"))
    failed = cherry_flow(config, fail_at="cherry-sft", return_state=True)
    assert failed.is_failed()
    states = task_states(failed.state_details.flow_run_id)
    assert states["cherry-instructions"] == "Completed" and states["cherry-pick"] == "Completed"
    assert states["cherry-sft"] == "Failed" and "score-likelihood" not in states

    rerun = cherry_flow(config, return_state=True)
    assert rerun.is_completed()
    states = task_states(rerun.state_details.flow_run_id)
    assert states["prepare-records"] == states["cherry-instructions"] == states["cherry-pick"] == "Cached"
    assert states["cherry-sft"] == states["score-likelihood"] == states["select-ifd"] == "Completed"
    out = rerun.result()
    sft = out["pre_experience_sft"]
    sft_dir = str(sft.file(sft.params["model_dir"]))
    assert out["scores"].params["scorer"] == sft_dir  # IFD from the pre-experienced model
    assert sft.params["model_dir"] == "train/model"  # relative: a moved store still finds it
    assert len(out["pre_experience"].file("pre_experience_ids.txt").read_text().split()) == 6
    # pre-experienced on the text it is then scored on (wiz), not through the chat template
    trained = [json.loads(line) for line in out["pre_experience"].file("pre_experience.train.jsonl").open()]
    assert len(trained) == 6 and all(row["prompt"].endswith("\n\n### Response:") for row in trained)
    # every profiled instruction with its cluster; the picked ones are exactly the pre-experience set
    clusters = [json.loads(line) for line in out["pre_experience"].file("pre_experience_clusters.jsonl").open()]
    profiled = [json.loads(line) for line in out["instructions"].file("perplexity.jsonl").open()]
    assert [c["id"] for c in clusters] == [p["id"] for p in profiled] and {c["cluster"] for c in clusters} == {0, 1}
    assert [c["id"] for c in clusters if c["picked"]] == out["pre_experience"].file(
        "pre_experience_ids.txt").read_text().split()
    assert out["pre_experience"].metrics["cluster_size_min"] + out["pre_experience"].metrics["cluster_size_max"] == len(
        clusters)
    selection = out["selection"]
    assert selection.metrics["selected"] == int(selection.metrics["passing_threshold"] * 0.5)

    mlc, children = _child_runs("cherry-flow-test")
    select = next(c for c in children if c.data.tags["pomona.stage"] == "select-cherry")
    assert select.data.params["scorer"] == sft_dir and select.data.params["template"] == "wiz"
    assert {"scored", "dropped_above_threshold", "truncated", "skipped", "selected"} <= set(select.data.metrics)
    assert {"ifd_histogram.png", "selected_ids.txt", "subset.jsonl"} <= {a.path for a in mlc.list_artifacts(select.info.run_id)}
    assert select.inputs.dataset_inputs[0].dataset.name == "cherry-subset"
    pick = next(c for c in children if c.data.tags["pomona.stage"] == "cherry-pick"  # the run that computed it
                and c.data.tags.get("pomona.cached") != "true")
    assert {"pre_experience.png", "pre_experience_clusters.jsonl"} <= {
        a.path for a in mlc.list_artifacts(pick.info.run_id)}
    score = next(c for c in children if c.data.tags["pomona.stage"] == "score")
    # the stage manifest (DESIGN.md): which shards the scores were assembled from, with their sha256
    assert "scores/_part-manifest.json" in {a.path for a in mlc.list_artifacts(score.info.run_id, "scores")}


def test_superfilter_flow_with_diversity_step(prefect_server):
    from flows.superfilter import superfilter_flow

    scoring = ScoringConfig(scorer=ModelConfig(name_or_path="tiny:1"), template="superfilter", max_length=300)
    selection = SuperfilterSelection(scoring=scoring, budget=8, diversity=DiversityConfig(budget=4, max_length=128))
    config = SuperfilterFlowConfig(data=DATA_CFG, selection=selection,
                                   tracking=TrackingConfig(experiment="superfilter-flow-test"))
    out = superfilter_flow(config)
    ifd_ids = out["ifd_selection"].file("selected_ids.txt").read_text().split()
    final = out["selection"].file("selected_ids.txt").read_text().split()
    assert out["selection"].stage == "select-superfilter-d" and len(final) == 4 and set(final) <= set(ifd_ids)
    assert 0 < out["selection"].metrics["coverage"] <= 1 and "coverage.png" in out["selection"].artifacts
    _, children = _child_runs("superfilter-flow-test")
    assert {c.data.tags["pomona.stage"] for c in children} == {
        "records", "score", "select-superfilter", "select-superfilter-d"}
    score = next(c for c in children if c.data.tags["pomona.stage"] == "score")
    assert score.data.params["scorer"] == "tiny:1" and score.data.params["template"] == "superfilter"
