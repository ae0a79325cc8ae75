"""GRAPE flow: (instructions) -> generate per generator -> candidates -> fit under the target -> select.

`grape_stages` is the part the pipeline's selection dispatch (flows/selection.py) also calls; `grape_flow` runs
a stand-alone GRAPE recipe (`pomona run --flow grape configs/recipes/grape_vicuna_smollm2.yaml`).
"""

from __future__ import annotations


from prefect import flow

from configs.grape import GrapeRecipe, GrapeSelection
from flows.selection import warn_short_of_budget
from flows.wiring import fail_at_switch, run_stage_task
from models.generation import GenerationError
from tasks.data import prepare_records_task
from tasks.generate import collect_candidates_task, generate_candidates_task
from tasks.grape import grape_select_task, ingest_candidates_task, score_candidate_fit_task
from tasks.store import StageOutput
from tasks.track import tracked_run


def grape_candidates(selection: GrapeSelection, records: StageOutput | None,
                     parent_run_id: str | None = None) -> StageOutput:
    """The candidates table: from the file, or from every generator (each its own resumable stage)."""
    if selection.candidates is not None:
        return run_stage_task(ingest_candidates_task, selection.candidates, parent_run_id=parent_run_id,
                              log_config=selection.candidates)
    if records is None:
        raise ValueError("GRAPE with generators needs prepared instruction records")
    finished: list[StageOutput] = []
    failures: dict[str, str] = {}
    for generator in selection.generators:
        try:
            finished.append(run_stage_task(generate_candidates_task, records, generator,
                                           selection.generation_shard_size, parent_run_id=parent_run_id,
                                           log_config=generator))
        except Exception as exc:  # noqa: BLE001 - one generator's failure must not cost the others their turn
            failures[generator.name] = f"{type(exc).__name__}: {exc}"
            print(f"generator {generator.name!r} failed: {failures[generator.name]}")
    if failures and (selection.on_generator_failure == "fail" or not finished):
        done = ", ".join(o.stage for o in finished) or "none"
        hint = ", or set on_generator_failure: continue to select among the others" if finished else ""
        raise GenerationError(
            f"{len(failures)} of {len(selection.generators)} generators failed: "
            + "; ".join(f"{k}: {v}" for k, v in failures.items())
            + f". Finished generators are kept and cached ({done}); fix the failing ones and rerun to resume{hint}")
    return run_stage_task(collect_candidates_task, records, finished, failures, parent_run_id=parent_run_id)


def grape_stages(selection: GrapeSelection, records: StageOutput | None, output_format: str = "source",
                 parent_run_id: str | None = None) -> dict[str, StageOutput]:
    """candidates -> fit -> select; the `selection` output holds subset.* (and pairs.jsonl with dpo.enabled)."""
    candidates = grape_candidates(selection, records, parent_run_id)
    fit = run_stage_task(score_candidate_fit_task, candidates, selection, parent_run_id=parent_run_id,
                         log_config=selection)
    chosen = run_stage_task(grape_select_task, candidates, fit, selection, output_format,
                            parent_run_id=parent_run_id, log_config=selection)
    warn_single_candidates(chosen)
    return {"candidates": candidates, "fit": fit, "selection": chosen}


def warn_single_candidates(chosen: StageOutput) -> None:
    """Say in the run's log when GRAPE had nothing to choose for every instruction (one candidate each): the subset
    is then one generator's answers, whatever the target model fits (e.g. the other generators failed)."""
    single = int(chosen.metrics.get("single_candidate_instructions", 0))
    if single and single == int(chosen.metrics.get("instructions_scored", -1)):
        from prefect.logging import get_run_logger

        get_run_logger().warning("GRAPE chose nothing: every one of the %d scored instructions had a single candidate "
                                 "response, so the subset is those responses as they came (see select-grape's "
                                 "summary)", single)


@flow(name="pomona-grape", log_prints=True)
@fail_at_switch
def grape_flow(config: GrapeRecipe, fail_at: str | None = None) -> dict[str, StageOutput]:
    """GRAPE: answer the instructions with several generators (or read their answers), keep the answer the target
    model finds most probable, write the SFT set and optional DPO pairs; tracked under one MLflow parent run.

    Args:
        config: The GRAPE recipe: instructions (or a candidates file), generators, target, criterion, DPO options.
        fail_at: Test-only. The Prefect task name of a stage that raises once Running, on the first attempt only.
    """
    with tracked_run(config) as parent:
        records = None
        if config.data is not None:
            records = run_stage_task(prepare_records_task, config.data, False, parent_run_id=parent,
                                     log_config=config.data)
        outputs = grape_stages(config.selection, records, config.output_format, parent_run_id=parent)
        warn_short_of_budget(config.selection, outputs["selection"], records)
    return ({"records": records} if records is not None else {}) | outputs

