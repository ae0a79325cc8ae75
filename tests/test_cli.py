"""The `pomona` command line: recipes validated and run as the flow they are for, errors as exit code 2."""

from __future__ import annotations

from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import REPO


def invoke(*args: str, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their data relative to the repository root
    return CliRunner().invoke(app, list(args))


def test_validate_reads_a_recipe_as_the_named_flow(monkeypatch):
    done = invoke("validate", "--flow", "compare", "configs/recipes/compare_tiny.yaml", monkeypatch=monkeypatch)
    assert done.exit_code == 0, done.output
    assert "method: grape" in done.output and "budget: 10" in done.output
    wrong = invoke("validate", "configs/recipes/compare_tiny.yaml", monkeypatch=monkeypatch)  # not a pipeline recipe
    assert wrong.exit_code == 2 and "selection" in wrong.output


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
