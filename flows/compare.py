"""The comparison flow: every method selects at the same budget, trains identically, is evaluated identically.

    records -> for each method (independent branch): select -> SFT -> evaluate -> comparison table + plots

MLflow: one parent run for the comparison, a child run `method:<label>` per method (its metrics, or its error;
the method's stages nest under it), and the comparison table + plots on the parent. Prefect: a table artifact.
Branches are submitted as tasks: one that fails is reported as a failed row and the others go on. Ctrl-C or SIGTERM
interrupts the running branch too (it runs in a worker thread, which signals do not reach: see
`tasks.runner.WorkerThreads`), so the run ends within seconds, not after the branch has trained and evaluated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from configs.compare import CompareConfig
from configs.errors import ComparisonFailed, ConfigError
from flows.evaluate import evaluate_stages
from flows.selection import select_subset
from flows.train import run_training_stage
from flows.wiring import fail_at_switch, run_stage_task
from tasks.data import prepare_records_task, read_jsonl
from tasks.evaluate import comparison_task, finish_method_run, headline_metrics, model_fingerprint, start_method_run
from tasks.runner import interruptible, interrupting_workers
from tasks.store import StageOutput
from tasks.train import sft_stage_task, trained_model
from tasks.track import artifact_key, client, tracked_run


@task(name="compare-method", cache_policy=NO_CACHE)
def compare_method(label: str, selection: Any, records: StageOutput, config: CompareConfig,
                   parent_run_id: str | None) -> dict:
    """One branch: select -> SFT -> evaluate (selection None: evaluate the base model). Returns its table row.

    Its stages commit as each finishes (CommitMode.EAGER): nested in this task run, they would otherwise commit with
    it, so a branch failing in evaluation rolled back its finished selection and training - RolledBack in the
    Prefect UI, their cache records never written - though their store folders were finished and reused."""
    from prefect.transactions import CommitMode, transaction

    # an interrupted comparison interrupts its running branch (see tasks.runner.WorkerThreads)
    with interruptible(), transaction(commit_mode=CommitMode.EAGER):
        return _compare_method(label, selection, records, config, parent_run_id)


def _compare_method(label: str, selection: Any, records: StageOutput, config: CompareConfig,
                    parent_run_id: str | None) -> dict:
    run_id = start_method_run(parent_run_id, label, selection) if parent_run_id else None
    metrics: dict[str, float] = {}
    try:
        if selection is None:
            model, digest = config.training.model, model_fingerprint(config.training.model)
        else:
            subset = select_subset(selection, records, config.output_format, parent_run_id=run_id)
            trained = run_training_stage(sft_stage_task, subset, config.training.model, config.training.sft,
                                         parent_run_id=run_id,
                                         log_config={"sft": config.training.sft, "model": config.training.model})
            # the comparison's premise is one data size: a method whose filters left fewer says so in its row
            metrics.update(headline_metrics((selection, subset, records), trained))
            model, digest = trained_model(trained, config.training.model), trained.digest
        table = evaluate_stages(model, digest, config.evaluate, f"{config.name}-{label}", run_id)
        metrics.update(headline_metrics(evaluation=table))
    except BaseException as exc:  # an interrupt too: the method's run must not stay RUNNING
        if run_id:
            finish_method_run(run_id, metrics, ended_by=exc)
        raise
    if run_id:
        finish_method_run(run_id, metrics)
    return {"label": label, "status": "ok", "metrics": metrics}


@task(name="log-comparison", cache_policy=NO_CACHE)
def log_comparison(parent_run_id: str, table: StageOutput) -> None:
    """The comparison table and plots as artifacts of the parent run itself (not only of its stage child)."""
    mlc = client()
    for rel in table.artifacts:
        folder = str(Path(rel).parent) if Path(rel).parent != Path(".") else None
        mlc.log_artifact(parent_run_id, str(table.file(rel)), artifact_path=folder)
    mlc.log_metric(parent_run_id, "methods_failed", table.metrics["methods_failed"])


@flow(name="pomona-compare", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
@fail_at_switch
def compare(config: CompareConfig, fail_at: str | None = None) -> StageOutput:
    """Compare selection methods at one budget; returns the `compare-table` stage (comparison.csv, plots).

    Branches run one at a time by default (one accelerator, and CPU training is already multi-threaded); a
    failed branch becomes a 'failed' row with its error. For parallel branches on a big machine, run
    `compare.with_options(task_runner=ThreadPoolTaskRunner(max_workers=N))`.

    Args:
        config: The comparison recipe: data, budget, methods, training, evaluation.
        fail_at: Test-only. The Prefect task name of a stage that raises once Running on the first attempt.
    """
    with tracked_run(config) as parent:
        records = run_stage_task(prepare_records_task, config.data, parent_run_id=parent, log_config=config.data)
        check_budget_below_pool(config, int(records.metrics["records_used"]))
        branches: list[tuple[str, Any]] = list(zip(config.labels(), config.methods))
        if config.evaluate_base:
            branches.insert(0, ("base", None))
        results = []
        with interrupting_workers("comparison branch(es)"):
            futures = [(label, compare_method.submit(label, selection, records, config, parent))
                       for label, selection in branches]
            for label, future in futures:
                outcome = future.result(raise_on_failure=False)
                if isinstance(outcome, BaseException):
                    print(f"method {label} failed: {type(outcome).__name__}: {outcome}")
                    results.append({"label": label, "status": "failed",
                                    "error": f"{type(outcome).__name__}: {outcome}", "metrics": {}})
                else:
                    results.append(outcome)
        table = run_stage_task(comparison_task, config.name, results, config.plot_metrics, parent_run_id=parent)
        create_table_artifact(key=artifact_key(f"compare-{config.name}"), table=read_jsonl(table.file("comparison.jsonl")),
                              description=f"Selection methods compared at one budget ({config.name})")
        if parent:
            log_comparison(parent, table)
    comparison_outcome(results, table)
    return table


def check_budget_below_pool(config: CompareConfig, pool: int) -> None:
    """A shared budget that keeps the whole pool makes every method select everything: the comparison would train
    the same model N times and compare nothing (the selection methods only cap at the pool size)."""
    if config.budget is not None and config.budget >= pool:
        raise ConfigError(f"budget {config.budget} >= the {pool} records used from {config.data.path}: every method "
                          "would keep the whole pool (the same as 'full'); lower the budget or give more records")


def comparison_outcome(results: list[dict], table: StageOutput) -> None:
    """Fail the run, after its table is written and logged, when no method finished or `plot_metrics` names a
    metric no method has: a run that compared nothing must not end Completed with exit status 0."""
    failed = [r for r in results if r["status"] != "ok"]
    if failed and len(failed) == len(results):
        raise ComparisonFailed(f"every method failed ({len(failed)}): "
                               + "; ".join(f"{r['label']}: {r['error']}" for r in failed))
    unknown = table.params.get("unknown_plot_metrics", "none")
    if unknown != "none":
        have = [k for k in read_jsonl(table.file("comparison.jsonl"))[0] if k not in ("method", "status", "error")]
        raise ComparisonFailed(f"plot_metrics {unknown.split(',')} are not metrics of this comparison (have {have}); "
                               f"the table is written: {table.file('comparison.csv')}")
