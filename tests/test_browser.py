"""Headless Chromium looks at what a user sees: the Prefect UI page of a finished run, the MLflow UI page of its
experiment (the rerun scenario of test_operations), the run form of the served pipeline. Screenshots are kept as test artifacts in
`pomona-runs/screenshots/` (and the test's tmp dir).

Needs Debian's chromium (`apt-get install -y chromium`); skipped without /usr/bin/chromium.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.live_servers import DEPLOYMENT, EXPERIMENT, rerun_scenario

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "pomona-runs" / "screenshots"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium")


def chromium(url: str, profile: Path, screenshot: Path, wait_ms: int = 15000) -> str:
    """Load `url` headless, give its scripts `wait_ms` of virtual time, save a PNG, return the rendered DOM."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1600,1000",
             f"--virtual-time-budget={wait_ms}", f"--screenshot={screenshot}", "--dump-dom"]
    done = subprocess.run([str(CHROMIUM), *flags, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_not_blank(png: Path) -> None:
    from PIL import Image

    assert png.exists() and png.stat().st_size > 10_000, f"{png} missing or tiny"
    with Image.open(png) as image:
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, f"{png} looks blank ({len(colors or [])} colours)"


@pytest.fixture(scope="module")
def scenario():
    """The rerun scenario of test_operations: a run that failed, was retried, and finished."""
    return rerun_scenario()


def keep(png: Path) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy2(png, SCREENSHOTS / png.name)


def test_prefect_ui_shows_the_retried_run(scenario, tmp_path):
    run = scenario.retried
    png = tmp_path / "prefect-flow-run.png"
    dom = chromium(f"{scenario.stack.prefect_ui}/runs/flow-run/{run.id}", tmp_path / "profile", png)
    assert run.name in dom and "Completed" in dom and "pomona-pipeline" in dom
    assert_not_blank(png)
    keep(png)


def test_mlflow_ui_shows_the_experiment(scenario, tmp_path):
    from mlflow import MlflowClient

    experiment = MlflowClient(scenario.stack.mlflow_url).get_experiment_by_name(EXPERIMENT)
    png = tmp_path / "mlflow-experiment.png"
    # The runs table (MLflow 3 opens experiments on a GenAI overview otherwise).
    dom = chromium(f"{scenario.stack.mlflow_url}/#/experiments/{experiment.experiment_id}/runs",
                   tmp_path / "profile", png)
    # The experiment, its pipeline runs (named after the recipe) and the subset logged as their dataset input.
    assert EXPERIMENT in dom and ">demo<" in dom and "random-subset" in dom
    assert_not_blank(png)
    keep(png)


def test_prefect_run_form_shows_the_selection_as_buttons_and_fields(scenario, tmp_path):
    """The form is rendered from the rewritten schema (`configs.form_schema`): one button per method, the recipe's
    method shown, fields with their labels in their declared order (the inputs' values are not in the DOM Chromium
    dumps). The shared stack's Prefect server runs on PostgreSQL where it answers, as in production."""
    with scenario.stack.client() as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    png = tmp_path / "prefect-run-form.png"
    dom = chromium(f"{scenario.stack.prefect_ui}/deployments/deployment/{deployment.id}/run", tmp_path / "profile",
                   png)
    text = re.sub(r"<[^>]+>", "\n", re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    methods = ["full", "longest", "random", "cherry", "superfilter", "grape", "deita"]
    start = lines.index("full")
    assert lines[start:start + len(methods)] == methods  # the selection's buttons (configs/form_schema.py's order)
    # the demo's method (random) is the one shown, its fields in their declared order: a Prefect server on
    # PostgreSQL keeps the schema as JSONB, which sorts keys (shortest first), unless each field has a `position`
    assert lines[start + len(methods):start + len(methods) + 2] == [
        "Budget (Optional)", "Keep exactly this many samples (fewer if fewer remain)."]
    assert lines.index("Name") < lines.index("Data (Optional)") < lines.index("Path") < lines.index(
        "Format (Optional)") < lines.index("Selection")
    for label in ("Budget (Optional)", "Seed (Optional)", "Data (Optional)", "Path", "Model", "Name Or Path"):
        assert label in lines, label  # a section's label is its field's, and required fields are not "(Optional)"
    assert_not_blank(png)
    keep(png)
