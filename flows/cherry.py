"""Cherry (IFD v1): instructions -> pre-experience pick -> brief SFT -> likelihood scores -> IFD subset.

Each step is its own cached stage task, so a failed step reruns alone and the steps before it show as Cached.
"""

from __future__ import annotations

from prefect import flow

from configs.ifd import CherryFlowConfig, CherrySelection
from flows.selection import warn_short_of_budget
from flows.wiring import fail_at_switch, run_stage_task
from tasks.data import prepare_records_task
from tasks.ifd import ifd_selection_task, instruction_profile_task, pre_experience_pick_task, pre_experience_sft_task
from tasks.score import score_task
from tasks.store import StageOutput
from tasks.track import tracked_run


def cherry_stage_outputs(selection: CherrySelection, records: StageOutput, output_format: str = "source",
                         parent_run_id: str | None = None) -> dict[str, StageOutput | None]:
    """Every Cherry stage's output (the pre-experience ones are None when `pre_experience` is off)."""
    profile = pick = sft = None
    pre = selection.pre_experience
    if pre is not None:
        profile = run_stage_task(instruction_profile_task, records, selection.scoring, pre,
                                 parent_run_id=parent_run_id, log_config=selection.scoring)
        pick = run_stage_task(pre_experience_pick_task, records, profile, pre, selection.scoring.template,
                              parent_run_id=parent_run_id, log_config=pre.model_dump(mode="json", exclude={"sft"}))
        sft = run_stage_task(pre_experience_sft_task, pick, selection.scoring, pre,
                             parent_run_id=parent_run_id, log_config=pre.sft)
    scores = run_stage_task(score_task, records, selection.scoring, sft,
                            parent_run_id=parent_run_id, log_config=selection.scoring)
    subset = run_stage_task(ifd_selection_task, records, scores, selection, output_format,
                            parent_run_id=parent_run_id,
                            log_config=selection.model_dump(mode="json", exclude={"scoring", "pre_experience"}))
    return {"instructions": profile, "pre_experience": pick, "pre_experience_sft": sft, "scores": scores,
            "selection": subset}


def cherry_stages(selection: CherrySelection, records: StageOutput, output_format: str = "source",
                  parent_run_id: str | None = None) -> StageOutput:
    """The Cherry stages on prepared records; returns the stage holding `subset.*` (used by flows/selection.py)."""
    return cherry_stage_outputs(selection, records, output_format, parent_run_id)["selection"]


@flow(name="pomona-cherry", log_prints=True)
@fail_at_switch
def cherry_flow(config: CherryFlowConfig, fail_at: str | None = None) -> dict[str, StageOutput | None]:
    """Cherry selection on its own, tracked under one MLflow parent run.

    Args:
        config: Data, the Cherry selection (scorer, template, pre-experience, IFD rule, budget), output format.
        fail_at: Test-only. The Prefect task name of a stage (e.g. 'cherry-sft') that raises once Running, on this
            flow run's first attempt only; Retry the run (or rerun without it) to resume from the cache.
    """
    with tracked_run(config) as parent:
        records = run_stage_task(prepare_records_task, config.data, parent_run_id=parent, log_config=config.data)
        stages = cherry_stage_outputs(config.selection, records, config.output_format, parent_run_id=parent)
        warn_short_of_budget(config.selection, stages["selection"], records)
    return {"records": records, **stages}
