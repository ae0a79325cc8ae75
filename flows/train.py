"""Training flows: SFT on a data file, DPO on preference pairs, and the training part of the pipeline.

Training stages open their MLflow child run themselves (so the Trainer's loss and learning-rate curves land in it
while it trains); `run_training_stage` then logs the stage's config, metrics and dataset into that same run, or,
when the stage was reused, into a new child run tagged cached.
"""

from __future__ import annotations

from prefect import flow

from configs.selection import FullSelection
from configs.train import DPOFlowConfig, SFTFlowConfig, TrainingConfig
from flows.selection import select_subset
from flows.wiring import fail_at_switch, run_stage_task
from tasks.data import prepare_records_task
from tasks.store import StageOutput
from tasks.track import client, log_stage, tracked_run, tracked_run_or_none
from tasks.train import PROVENANCE_TAGS, dpo_stage_task, sft_stage_task


def run_training_stage(stage_task, *args, parent_run_id: str | None = None, log_config=None, **kwargs) -> StageOutput:
    """Run a training stage task (cached like any stage) and log it into the child run it trained in."""
    out = run_stage_task(stage_task, *args, tracking=parent_run_id, **kwargs)
    if parent_run_id:
        trained_in = out.params.get("train.mlflow_run_id")
        # A reused stage's run was logged by the run that trained it: this run gets its own cached child run. The
        # training run is this run's own only under this parent: a concurrent run that waited on the stage lock
        # and reused the stage before its trainer logged it must not log into the trainer's run.
        trained_run = tracked_run_or_none(trained_in) if trained_in else None
        fresh = (trained_run is not None and trained_run.data.tags.get("pomona.logged") != "true"
                 and trained_run.data.tags.get("mlflow.parentRunId") == parent_run_id)
        run_id = log_stage(parent_run_id, out, config=log_config, cached=not fresh,
                           run_id=trained_in if fresh else None)
        client().set_tag(run_id, "pomona.logged", "true")
        if not fresh and trained_in:
            client().set_tag(run_id, "pomona.trained_in_run", trained_in)
        if not fresh and trained_run is not None:
            # the reused run names the subset as its trainer does: a search by tags.dataset_digest finds both
            for key in PROVENANCE_TAGS:
                if key in trained_run.data.tags:
                    client().set_tag(run_id, key, trained_run.data.tags[key])
    return out


def training_stages(training: TrainingConfig, selection: StageOutput, parent_run_id: str | None = None,
                    pairs: StageOutput | None = None) -> dict[str, StageOutput]:
    """SFT on the selection's subset, then optional DPO from the SFT model (pairs from `pairs`, the selection, or
    the DPO config's file)."""
    outputs: dict[str, StageOutput] = {}
    if training.sft is not None:
        outputs["sft"] = run_training_stage(sft_stage_task, selection, training.model, training.sft,
                                            parent_run_id=parent_run_id,
                                            log_config={"sft": training.sft, "model": training.model})
    if training.dpo is not None:
        outputs["dpo"] = run_training_stage(dpo_stage_task, pairs or selection, training.model, training.dpo,
                                            outputs.get("sft"), parent_run_id=parent_run_id,
                                            log_config={"dpo": training.dpo, "model": training.model})
    return outputs


@flow(name="pomona-sft", log_prints=True)
@fail_at_switch
def sft(config: SFTFlowConfig, fail_at: str | None = None) -> dict[str, StageOutput]:
    """Fine-tune a model on every record of a data file (then optional DPO), tracked under one MLflow run.

    Args:
        config: Data file, base model, SFT (and DPO) hyper-parameters, tracking.
        fail_at: Test-only. The Prefect task name of a stage (e.g. 'train-sft') that raises once Running, on this
            flow run's first attempt only.
    """
    with tracked_run(config) as parent:
        records = run_stage_task(prepare_records_task, config.data, parent_run_id=parent, log_config=config.data)
        subset = select_subset(FullSelection(), records, "messages", parent_run_id=parent)
        outputs = training_stages(TrainingConfig(model=config.model, sft=config.sft, dpo=config.dpo), subset, parent)
    return outputs


@flow(name="pomona-dpo", log_prints=True)
@fail_at_switch
def dpo(config: DPOFlowConfig, fail_at: str | None = None) -> StageOutput:
    """Preference-tune a model on a pairs file (ShareGPT DPO JSON or GRAPE pairs JSONL).

    Args:
        config: Start model, DPO hyper-parameters (with the pairs file), tracking.
        fail_at: Test-only. The Prefect task name of a stage ('train-dpo') that raises once Running.
    """
    with tracked_run(config) as parent:
        out = training_stages(TrainingConfig(model=config.model, sft=None, dpo=config.dpo), None, parent)["dpo"]
    return out
