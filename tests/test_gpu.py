"""CUDA checks of the numeric paths: skipped without CUDA (see conftest), run by `bench/gpu_checks.sh`.

Only numpy, torch, pydantic and transformers are imported here (no Prefect or MLflow), so this file runs on a GPU
machine that carries just those wheels.
"""

from __future__ import annotations

import json
import math

import pytest

from configs.schema import ModelConfig
from models.likelihood import head_nll, reference_scores, score_requests
from models.loading import load_model
from models.templates import build_pair
from tasks.deita_selection import diversity_filter, diversity_filter_sequential, ranking_order
from tests.conftest import DATA
from tests.test_deita import planted

pytestmark = pytest.mark.gpu

ROWS = json.loads((DATA / "alpaca_cherry_40.json").read_text())


def _requests(tok, template: str, n: int):
    pairs = [build_pair(template, tok, r["instruction"], r.get("input", ""), r["output"], 512) for r in ROWS[:n]]
    return [q for p in pairs if p.skip_reason is None for q in (p.conditioned, p.direct)]


@pytest.mark.parametrize("template", ["wiz", "superfilter"])
def test_engine_on_cuda_in_float32_matches_the_one_sample_loop(tiny_model_dir, template):
    import torch

    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", device="cuda"))
    assert next(model.parameters()).is_cuda and not torch.backends.cuda.matmul.allow_tf32
    requests = _requests(tok, template, 16)
    engine = score_requests(model, requests, batch_size=5, pad_id=tok.pad_token_id)
    loop = reference_scores(model, requests)
    assert max(abs(a.mean_nll - b.mean_nll) for a, b in zip(engine, loop)) < 1e-5


def test_load_model_on_cuda_loads_onto_the_current_gpu_without_a_host_copy(tiny_model_dir):
    """device_map puts the weights on this process's current GPU as they load (a Dask CUDA worker's own one)."""
    import torch

    last = torch.cuda.device_count() - 1
    before = torch.cuda.current_device()
    torch.cuda.set_device(last)  # as a worker pinned to another GPU sees it
    try:
        model, _ = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cuda"))
    finally:
        torch.cuda.set_device(before)
    assert model.hf_device_map == {"": torch.device("cuda", last)}
    assert {p.device for p in model.parameters()} == {torch.device("cuda", last)}
    assert next(model.parameters()).dtype == torch.bfloat16


def test_engine_on_cuda_in_bfloat16_stays_near_float32_on_cpu(tiny_model_dir):
    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="bfloat16", device="cuda"))
    cpu, _ = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32", device="cpu"))
    requests = _requests(tok, "wiz", 16)
    half = score_requests(model, requests, batch_size=8, pad_id=tok.pad_token_id)
    full = score_requests(cpu, requests, batch_size=8, pad_id=tok.pad_token_id)
    for a, b in zip(half, full):
        assert math.isfinite(a.nll_sum) and a.n_tokens == b.n_tokens
        assert abs(a.mean_nll - b.mean_nll) < 0.02 * b.mean_nll  # bf16 keeps ~3 significant digits


def test_tiled_head_on_cuda_equals_cross_entropy():
    import torch

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 5000, bias=False).cuda()
    hidden = torch.randn(300, 64, device="cuda")
    labels = torch.randint(0, 5000, (300,), device="cuda")
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(head(hidden), labels, reduction="none")
        for tile in [None, (128, 1024), (300, 4999)]:
            got = head_nll(head, hidden, labels, tile=tile)
            assert torch.allclose(got, expected, atol=2e-5, rtol=0), tile


def test_diversity_filter_on_cuda_equals_the_sequential_definition():
    x, scores = planted(3000, 96, 800, seed=3)
    order = ranking_order(scores)
    for budget in (5000, 700):
        expected = diversity_filter_sequential(x, order, 0.9, budget)
        for block in (64, 1024):
            for bound_dims in (0, 23):  # without and with the bound screen
                got = diversity_filter(x, order, 0.9, budget, block_size=block, device="cuda", bound_dims=bound_dims)
                assert got.selected.tolist() == expected.selected.tolist() and got.examined == expected.examined
        assert 0 < expected.rejected


@pytest.mark.parametrize("dtype", ["float16", "auto"])
def test_full_fine_tuning_on_cuda_takes_its_optimizer_steps(tiny_model_dir, tmp_path, dtype):
    """fp16 (and bf16) mixed precision on CUDA over the weights `training_weights_dtype` picks: float16 weights
    failed the first step ("Attempting to unscale FP16 gradients"). Needs TRL and Prefect, which the GPU kit does
    not carry: it skips there and runs in the CUDA image."""
    pytest.importorskip("trl")
    pytest.importorskip("prefect")
    from configs.train import SFTStageConfig
    from tasks.train import read_train_result, sft_train

    data = tmp_path / "train.messages.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                     {"role": "assistant", "content": r["output"]}]}) + "\n"
                            for r in ROWS[:8]))
    model = ModelConfig(name_or_path=str(tiny_model_dir), dtype=dtype, device="cuda")
    config = SFTStageConfig(max_steps=2, save_steps=100, per_device_train_batch_size=4, max_length=96,
                            logging_steps=1, learning_rate=1e-3)
    sft_train(data, model, config, tmp_path / "out")
    result = read_train_result(tmp_path / "out")
    assert result["global_step"] == 2 and result["device"] == "cuda" and math.isfinite(result["train_loss"])
