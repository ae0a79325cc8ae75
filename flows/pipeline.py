"""The end-to-end pipeline: records -> selection -> subset -> SFT (-> DPO) -> evaluation, under one MLflow parent run."""

from __future__ import annotations

from prefect import flow

from configs.pipeline import PipelineConfig
from flows.evaluate import evaluate_stages
from flows.selection import select_subset
from flows.train import training_stages
from flows.wiring import fail_at_switch, run_stage_task
from tasks.data import prepare_records_task
from tasks.evaluate import headline_metrics
from tasks.store import StageOutput
from tasks.track import log_run_metrics, tracked_run
from tasks.train import trained_model


@flow(name="pomona-pipeline", log_prints=True)
@fail_at_switch
def pipeline(config: PipelineConfig, fail_at: str | None = None) -> dict[str, StageOutput]:
    """Prepare the records, select a subset, (train, evaluate), all tracked under one MLflow parent run.

    Args:
        config: The recipe: name, data, selection (method and budget), output_format, train (optional: SFT, then
            DPO, of a base model on the subset), evaluate (optional: benchmarks of the trained model), tracking.
        fail_at: Test-only. The Prefect task name of a stage (e.g. 'select-baseline') that raises once Running,
            on this flow run's first attempt only; Retry the run (or rerun without it) to resume from the cache.
    """
    with tracked_run(config) as parent:
        records = None
        if config.data is not None:
            # GRAPE's generators answer the instructions themselves: the pool may come without responses.
            needs_responses = config.selection.method != "grape"
            records = run_stage_task(prepare_records_task, config.data, needs_responses, parent_run_id=parent,
                                     log_config=config.data)
        subset = select_subset(config.selection, records, config.output_format, parent_run_id=parent)
        outputs = ({"records": records} if records is not None else {}) | {"selection": subset}
        if config.train is not None:
            outputs.update(training_stages(config.train, subset, parent_run_id=parent))
            if config.evaluate is not None:
                final = outputs.get("dpo") or outputs["sft"]
                outputs["evaluation"] = evaluate_stages(trained_model(final, config.train.model), final.digest,
                                                        config.evaluate, config.name, parent)
        if parent:  # the run's headline on the parent, named as a comparison's method runs name it
            log_run_metrics(parent, headline_metrics((config.selection, subset, records), outputs.get("sft"),
                                                     outputs.get("dpo"), outputs.get("evaluation")))
    return outputs
