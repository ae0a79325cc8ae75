"""Test set-up: an isolated POMONA_HOME (before any pomona module is imported) and a Prefect test server."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Must precede pomona imports: Prefect tasks capture their result folder at import time.
os.environ["POMONA_HOME"] = tempfile.mkdtemp(prefix="pomona-test-")
os.environ.pop("MLFLOW_TRACKING_URI", None)

from configs.settings import prepare_environment  # noqa: E402

prepare_environment()

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
SHARED = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API for the whole session (about 12 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def run_log_warnings(monkeypatch) -> list[str]:
    """The warnings a flow run logs (what the Prefect UI shows), whatever the console handlers do under pytest."""
    import logging

    warned: list[str] = []
    catch = logging.Handler(logging.WARNING)
    catch.emit = lambda record: warned.append(record.getMessage())
    logger = logging.getLogger("prefect.flow_runs")
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, catch])
    return warned


def task_states(flow_run_id) -> dict[str, str]:
    """Final state name of each task run of a flow run, by task name ("prepare-records-f64" -> "prepare-records")."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


@pytest.fixture(scope="session")
def tiny_model_dir():
    """A tiny random Llama saved to disk, loaded in tests through the normal loader."""
    from models.tiny import build_tiny_model

    return build_tiny_model(Path(os.environ["POMONA_HOME"]) / "tiny-fixture-0", seed=0)


def _single_torch_thread():
    """Tiny models and matrices: thread wake-ups on a shared 2-core box cost more than the work itself."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


one_torch_thread = pytest.fixture(_single_torch_thread, name="one_torch_thread")
# For a whole module, module-scoped fixtures included: `pytestmark = pytest.mark.usefixtures(...)`.
one_torch_thread_per_module = pytest.fixture(_single_torch_thread, scope="module", name="one_torch_thread_per_module")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow")
    wants_slow = "slow" in (config.getoption("-m") or "")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not wants_slow:
            item.add_marker(skip_slow)


# ------------------------------------------------------------------ texts holding a special token's string
HELD_REASON = ("special token in the text: {where} holds '<|end|>', which the tokenizer would read as that control "
               "token, not as text")
"""The reject reason of a text holding the tiny tokenizer's '<|end|>' (ShareGPT V3 has replies ending in the text
'<|endoftext|>'); `where` names the field or message."""


def held_copies(tmp_path, rows: list[dict], held, wrap=lambda rows: rows):
    """Two files of the same `rows`: as they are, and with '<|end|>' appended to the named field of each named row
    (`held`: (row index, field) pairs, or a {row index: field} dict). `wrap` gives the file's top level."""
    import copy
    import json

    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps(wrap(rows)))
    rows = copy.deepcopy(rows)
    for i, field in (held.items() if isinstance(held, dict) else held):
        rows[i][field] += "\n\nSkipped 1 messages<|end|>"
    dirty = tmp_path / "held.json"
    dirty.write_text(json.dumps(wrap(rows)))
    return clean, dirty
