"""The comparison flow end to end on the tiny model: random / longest / full at budget 10 of 40 records, 2 SFT
steps each, evaluated; one extra branch fails on purpose and must not stop the others."""

from __future__ import annotations

import math

import pytest

from configs.compare import CompareConfig
from configs.pipeline import load_recipe
from tasks.data import read_jsonl
from tests.conftest import REPO


def test_compare_config_shares_one_budget():
    raw = {"name": "x", "data": {"path": "d.json"}, "budget": 5, "training": {"model": {"name_or_path": "tiny:0"}},
           "evaluate": {}, "methods": [{"method": "random"}, {"method": "longest"}, {"method": "full"},
                                       {"method": "random", "seed": 3}]}
    cfg = CompareConfig.model_validate(raw)
    assert [getattr(m, "budget", None) for m in cfg.methods] == [5, 5, None, 5]
    assert cfg.labels() == ["random-1", "longest", "full", "random-2"]
    with pytest.raises(ValueError, match="own budget"):
        CompareConfig.model_validate({**raw, "methods": [{"method": "random", "budget": 7}]})
    with pytest.raises(ValueError, match="exactly one"):
        CompareConfig.model_validate({**raw, "share": 0.5})


def test_the_shortfall_counts_against_the_budget_a_method_can_reach():
    from configs.grape import GrapeSelection
    from configs.ifd import CherrySelection, DiversityConfig, ScoringConfig, SuperfilterSelection
    from configs.schema import ModelConfig
    from configs.selection import FullSelection, RandomSelection
    from tasks.select import budget_shortfall
    from tasks.store import StageOutput

    def out(**metrics):
        return StageOutput(stage="s", key="k", path="/nowhere", digest="0", metrics=metrics)

    scoring = ScoringConfig(scorer=ModelConfig(name_or_path="tiny:0"))
    pool = out(records_used=40)
    assert budget_shortfall(RandomSelection(budget=10), out(selected=10), pool) == (10, 0)
    assert budget_shortfall(CherrySelection(budget=30, scoring=scoring), out(selected=21), pool) == (30, 9)
    assert budget_shortfall(RandomSelection(budget=50), out(selected=40), pool) == (40, 0)  # capped at the pool
    # Superfiltering.D is asked for its diversity budget; a share and a method without a budget ask no count
    d = SuperfilterSelection(budget=20, scoring=scoring, diversity=DiversityConfig(budget=5))
    assert budget_shortfall(d, out(selected=4), pool) == (5, 1)
    assert budget_shortfall(CherrySelection(share=0.5, scoring=scoring), out(selected=3), pool) == (0, 0)
    assert budget_shortfall(FullSelection(), out(selected=40), pool) == (0, 0)
    # GRAPE from a candidates file: no records stage, the pool is its instructions
    grape = GrapeSelection(budget=10, target=ModelConfig(name_or_path="tiny:0"),
                           candidates={"path": str(REPO / "tests/data/vicuna_two_models_12.json")})
    assert budget_shortfall(grape, out(selected=6, instructions=6), None) == (6, 0)
    assert budget_shortfall(grape, out(selected=5, instructions=12), None) == (10, 5)


def test_a_method_short_of_the_budget_is_named_in_the_comparison_not_plotted():
    from tasks.evaluate import comparison_stage

    results = [{"label": "random", "status": "ok", "metrics": {"selected": 10, "short_of_budget": 0, "nll": 2.0}},
               {"label": "deita", "status": "ok", "metrics": {"selected": 7, "short_of_budget": 3, "nll": 2.1}}]
    table = comparison_stage("short", results)
    assert table.metrics["methods_short_of_budget"] == 1
    assert table.summary.endswith("**Short of the budget** (trained on fewer samples): deita (3 fewer)")
    assert "| method | status | selected | nll |" in table.summary and "| deita | ok | 7 | 2.1000 |" in table.summary
    assert [r["short_of_budget"] for r in read_jsonl(table.file("comparison.jsonl"))] == [0, 3]
    assert sorted(table.artifacts) == ["comparison.csv", "comparison.jsonl", "plots/nll.png", "plots/selected.png"]


@pytest.mark.parametrize("metric, direction", [
    ("likelihood/mean_nll", "lower"), ("likelihood/perplexity", "lower"), ("train_loss", "lower"),
    ("instruction/all/lose_rate", "lower"), ("humaneval/pass_1", "higher"), ("pomona_mc/acc_none", "higher"),
    ("pomona_mc/acc_norm_none", "higher"), ("pomona_gen/exact_match_strip", "higher"),
    ("instruction/vicuna/win_rate", "higher"), ("instruction/all/winning_score", "higher"),
    ("instruction/all/quality", "higher"), ("instruction/all/tie_rate", None), ("selected", None),
    ("pomona_gen/sample_len", None)])
def test_comparison_charts_know_which_way_each_metric_is_better(metric, direction):
    from tasks.plots import metric_direction

    assert metric_direction(metric) == direction


def test_comparison_chart_marks_the_best_method_against_the_base_row(tmp_path):
    from PIL import Image

    from tasks.plots import best_method, comparison_chart

    rows = [("random", 6.353), ("cherry", 6.351), ("grape", 6.395)]
    assert best_method(rows, "lower") == "cherry" and best_method(rows, "higher") == "grape"
    assert best_method(rows, None) is None and best_method(rows[:1], "lower") is None
    assert best_method([("a", 1.0), ("b", 1.0)], "higher") is None  # a tie crowns nobody
    path = comparison_chart(["base", *[r[0] for r in rows]], [6.403, *[r[1] for r in rows]], tmp_path / "c.png",
                            "t", "likelihood/mean_nll")
    with Image.open(path) as image:  # three method rows, the base a line: the figure's height follows the rows
        assert image.size == (650, int((1.2 + 0.42 * 3) * 100))


def test_smollm2_recipe_validates():
    cfg = load_recipe(REPO / "configs/recipes/compare_smollm2.yaml", CompareConfig)
    assert {m.method for m in cfg.methods} >= {"random", "longest", "full"}


def test_compare_flow_end_to_end_with_a_failing_branch(prefect_server, tiny_model_dir, monkeypatch):
    import flows.compare as compare_module
    from prefect.client.orchestration import get_client
    from tasks.track import client

    real_evaluate = compare_module.evaluate_stages

    def evaluate_or_fail(model, digest, evaluate, name, *args, **kwargs):
        if name.endswith("-random-2"):  # after its selection and training stages completed
            raise RuntimeError("evaluation exploded on purpose")
        return real_evaluate(model, digest, evaluate, name, *args, **kwargs)

    monkeypatch.setattr(compare_module, "evaluate_stages", evaluate_or_fail)
    cfg = load_recipe(REPO / "configs/recipes/compare_tiny.yaml", CompareConfig, overrides={
        "data.path": str(REPO / "tests/data/alpaca_cherry_40.json"),
        "training.model.name_or_path": str(tiny_model_dir),  # the session's tiny model (same as tiny:0, built once)
        "evaluate.likelihood.data.path": str(REPO / "tests/data/alpaca_demo_200.json"),
        "methods": [{"method": "random", "seed": 0}, {"method": "longest"}, {"method": "full"},
                    {"method": "random", "seed": 1}]})

    table = compare_module.compare(cfg)

    rows = {r["method"]: r for r in read_jsonl(table.file("comparison.jsonl"))}
    assert list(rows) == ["base", "random-1", "longest", "full", "random-2"]
    assert rows["random-2"]["status"] == "failed" and "exploded on purpose" in rows["random-2"]["error"]
    for label in ("base", "random-1", "longest", "full"):
        assert rows[label]["status"] == "ok", rows[label]
        assert math.isfinite(rows[label]["likelihood/mean_nll"])
    assert [rows[m]["selected"] for m in ("random-1", "longest", "full")] == [10, 10, 40]
    assert rows["base"]["selected"] is None
    # Training moved the model: every trained row differs from the untrained base on held-out NLL.
    assert all(rows[m]["likelihood/mean_nll"] != rows["base"]["likelihood/mean_nll"] for m in ("random-1", "full"))
    assert table.file("comparison.csv").exists() and table.file("plots/likelihood__mean_nll.png").exists()
    assert table.metrics["methods_failed"] == 1

    mlc = client()
    exp = mlc.get_experiment_by_name("compare-tiny")
    runs = mlc.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "compare-tiny")
    methods = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
               and r.info.run_name.startswith("method:")}
    assert set(methods) == {"method:base", "method:random-1", "method:longest", "method:full", "method:random-2"}
    assert methods["method:random-2"].info.status == "FAILED"
    assert "exploded" in methods["method:random-2"].data.tags["pomona.error"]
    assert methods["method:full"].info.status == "FINISHED"
    assert methods["method:full"].data.metrics["selected"] == 40
    # The failed branch's finished stages stay Completed in Prefect (and cached for a rerun): Prefect rolled back
    # the stage task runs nested in a failed task run, showing a finished selection and training as RolledBack.
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[parent.data.tags["prefect.flow_run_id"]])))
    states = {}
    for run in task_runs:
        states.setdefault(run.state.name, []).append(run.name.rsplit("-", 1)[0])
    assert "RolledBack" not in states, states
    assert states["Failed"] == ["compare-method"], states
    # The method's stages nest under its run.
    nested = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == methods["method:full"].info.run_id}
    assert {"select-full", "train-sft", "eval-likelihood", "eval-table"} <= nested
    assert {a.path for a in mlc.list_artifacts(parent.info.run_id)} >= {"comparison.csv", "plots"}

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts()
    table_artifacts = [a for a in artifacts if a.key == "compare-compare-tiny"]
    assert table_artifacts and table_artifacts[0].type == "table"


def test_every_method_of_the_tiny_recipe_selects_trains_and_evaluates(prefect_server, tiny_model_dir):
    from flows.compare import compare
    from tasks.track import client

    cfg = load_recipe(REPO / "configs/recipes/compare_tiny.yaml", CompareConfig, overrides={
        "name": "compare-tiny-all", "evaluate_base": False,
        "data.path": str(REPO / "tests/data/alpaca_cherry_40.json"),
        "training.model.name_or_path": str(tiny_model_dir),
        "evaluate.likelihood.data.path": str(REPO / "tests/data/alpaca_demo_200.json")})
    assert [m.method for m in cfg.methods] == ["random", "longest", "full", "cherry", "superfilter", "deita", "grape"]

    table = compare(cfg)

    rows = {r["method"]: r for r in read_jsonl(table.file("comparison.jsonl"))}
    assert {label: row["status"] for label, row in rows.items()} == dict.fromkeys(
        ["random", "longest", "full", "cherry", "superfilter", "deita", "grape"], "ok"), rows
    assert {label: row["selected"] for label, row in rows.items()} == {
        "random": 10, "longest": 10, "full": 40, "cherry": 10, "superfilter": 10, "deita": 10, "grape": 10}
    assert {row["short_of_budget"] for row in rows.values()} == {0}  # every method reached the budget
    assert all(math.isfinite(row["likelihood/mean_nll"]) for row in rows.values())
    # Different subsets train different models: at least the four paper methods do not all tie.
    assert len({round(rows[m]["likelihood/mean_nll"], 6) for m in ("cherry", "superfilter", "deita", "grape")}) > 1

    mlc = client()
    runs = mlc.search_runs([mlc.get_experiment_by_name("compare-tiny-all").experiment_id])
    names = {r.info.run_name for r in runs}
    assert {"select-cherry", "select-superfilter", "select-deita", "select-grape", "method:grape"} <= names, names


def test_plot_metrics_are_named_as_users_know_them_and_unknown_ones_fail_after_the_table_is_written():
    from configs.errors import ComparisonFailed
    from flows.compare import comparison_outcome
    from tasks.evaluate import comparison_stage

    results = [{"label": "random", "status": "ok", "metrics": {"humaneval/pass_1": 0.25, "lm_eval/mc/acc_none": 0.5}},
               {"label": "deita", "status": "ok", "metrics": {"humaneval/pass_1": 0.5, "lm_eval/mc/acc_none": 0.75}}]
    table = comparison_stage("plot-names", results, ["humaneval/pass@1", "lm_eval/mc/acc,none"])
    assert table.file("plots/humaneval__pass_1.png").exists(), table.artifacts
    comparison_outcome(results, table)  # all fine: no error

    typo = comparison_stage("plot-names-typo", results, ["humaneval/pass@10", "humaneval/pass@1"])
    assert typo.file("comparison.csv").exists() and typo.file("plots/humaneval__pass_1.png").exists()
    with pytest.raises(ComparisonFailed, match=r"plot_metrics \['humaneval/pass_10'\] are not metrics.*pass_1"):
        comparison_outcome(results, typo)


def test_a_comparison_where_every_method_fails_is_a_failed_run_naming_each_error(prefect_server, monkeypatch):
    """Not Completed with exit status 0 (what a SmolLM2 recipe run before `make smollm2` used to end as); the
    table with the failed rows is still written, and plot_metrics are not blamed for the missing metrics."""
    import flows.compare as compare_module
    from configs.errors import ComparisonFailed

    def fail(selection, *args, **kwargs):
        raise RuntimeError(f"{selection.method} exploded on purpose")

    monkeypatch.setattr(compare_module, "select_subset", fail)
    cfg = load_recipe(REPO / "configs/recipes/compare_tiny.yaml", CompareConfig, overrides={
        "name": "compare-all-fail", "evaluate_base": False, "plot_metrics": ["likelihood/mean_nll"],
        "data.path": str(REPO / "tests/data/alpaca_cherry_40.json"),
        "methods": [{"method": "random"}, {"method": "longest"}]})

    state = compare_module.compare(cfg, return_state=True)

    assert state.is_failed()
    with pytest.raises(ComparisonFailed, match="every method failed \\(2\\): random: RuntimeError: random exploded.*"
                                               "longest: RuntimeError: longest exploded"):
        state.result()


def test_a_shared_budget_that_keeps_the_whole_pool_is_refused_before_any_training(prefect_server):
    from configs.errors import ConfigError
    from flows.compare import compare

    cfg = load_recipe(REPO / "configs/recipes/compare_tiny.yaml", CompareConfig, overrides={
        "name": "compare-budget-40", "budget": 40, "tracking.enabled": False,
        "methods": [{"method": "random"}, {"method": "longest"}],
        "data.path": str(REPO / "tests/data/alpaca_cherry_40.json")})
    state = compare(cfg, return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match="budget 40 >= the 40 records used from .*alpaca_cherry_40.json"):
        state.result()


@pytest.mark.parametrize("stem", ["compare_tiny", "compare_smollm2", "compare_smollm2_small"])
def test_the_shared_budget_of_a_bundled_comparison_can_be_overridden(stem):
    """`--set budget=N` reaches every budgeted method (a method repeating the recipe's budget used to clash)."""
    cfg = load_recipe(REPO / "configs/recipes" / f"{stem}.yaml", CompareConfig, overrides={"budget": 7})
    assert {getattr(m, "budget", None) for m in cfg.methods if m.method != "full"} == {7}
