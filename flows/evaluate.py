"""The evaluation flow: run the configured benchmarks on one model folder; one table in MLflow and in Prefect."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from configs.evaluate import EvaluateConfig, EvaluateFlowConfig
from configs.schema import ModelConfig
from flows.wiring import fail_at_switch, run_stage_task
from tasks.evaluate import (answers_task, eval_table_task, humaneval_task, judge_task, likelihood_task, lm_eval_task,
                            model_fingerprint, table_rows)
from tasks.store import StageOutput
from tasks.track import artifact_key, tracked_run


def evaluate_stages(model: ModelConfig, model_digest: str, config: EvaluateConfig, label: str,
                    parent_run_id: str | None = None) -> StageOutput:
    """Every configured evaluation of one model as its own cached stage, then the merged `eval-table` stage."""
    results: dict[str, StageOutput] = {}
    if config.lm_eval is not None:
        results["lm_eval"] = run_stage_task(lm_eval_task, model, model_digest, config.lm_eval,
                                            parent_run_id=parent_run_id, log_config=config.lm_eval)
    if config.instruction is not None:
        inst = config.instruction
        answers = run_stage_task(answers_task, model, model_digest, inst, config.generation,
                                 parent_run_id=parent_run_id, log_config=config.generation)
        baseline = None
        if inst.pairwise and inst.baseline_model is not None:
            baseline = run_stage_task(answers_task, inst.baseline_model, model_fingerprint(inst.baseline_model), inst,
                                      config.generation, parent_run_id=parent_run_id, log_config=inst.baseline_model)
        results["judge"] = run_stage_task(judge_task, answers, baseline, inst, config.judge,
                                          parent_run_id=parent_run_id, log_config=config.judge)
    if config.humaneval is not None:
        results["humaneval"] = run_stage_task(humaneval_task, model, model_digest, config.humaneval, config.generation,
                                              parent_run_id=parent_run_id, log_config=config.humaneval)
    if config.likelihood is not None:
        results["likelihood"] = run_stage_task(likelihood_task, model, model_digest, config.likelihood,
                                               parent_run_id=parent_run_id, log_config=config.likelihood)
    table = run_stage_task(eval_table_task, label, results, parent_run_id=parent_run_id)
    create_table_artifact(key=artifact_key(f"eval-{label}"), table=table_rows(table),
                          description=f"Evaluation of {label} ({model.name_or_path})")
    return table


@flow(name="pomona-evaluate", log_prints=True)
@fail_at_switch
def evaluate(config: EvaluateFlowConfig, fail_at: str | None = None) -> StageOutput:
    """Evaluate one model (e.g. a training stage's `model/` folder) with the configured benchmarks.

    Args:
        config: The model and which evaluations to run on it.
        fail_at: Test-only. The Prefect task name of a stage (e.g. 'eval-judge') that raises once Running, on this
            flow run's first attempt only; Retry the run (or rerun without it) to resume from the cache.
    """
    with tracked_run(config) as parent:
        table = evaluate_stages(config.model, model_fingerprint(config.model), config.evaluate, config.name, parent)
    return table
