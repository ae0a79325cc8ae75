"""DeepSpeed ZeRO-2 on CPU over gloo, launched with torchrun as a subprocess of the stage, logging into the
stage's MLflow run through MLFLOW_RUN_ID. The first run on a machine compiles DeepSpeed's shm op (about a minute)
into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions); later runs reuse it."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs.schema import DataConfig, ModelConfig
from configs.selection import FullSelection
from configs.train import SFTStageConfig
from tasks.data import prepare_records
from tasks.select import baseline_selection
from tasks.train import read_train_result, sft_stage

from conftest import DATA

pytest.importorskip("deepspeed")


def test_zero2_through_torchrun_logs_into_the_stage_run_and_reloads():
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.track import client, start_parent_run

    records = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=12))
    selection = baseline_selection(records, FullSelection(), "messages")
    parent = start_parent_run("deepspeed-tests", "deepspeed-tests", SFTStageConfig(), None)
    config = SFTStageConfig(max_steps=3, save_steps=100, per_device_train_batch_size=4, max_length=96, logging_steps=1,
                            learning_rate=1e-3, deepspeed="zero2", launcher="torchrun", num_processes=1)
    out = sft_stage(selection, ModelConfig(name_or_path="tiny:0"), config, tracking=parent)

    folder = Path(out.path)
    result = read_train_result(folder)
    assert result["deepspeed"] == "zero2" and result["global_step"] == 3
    log = (folder / "launcher.log").read_text()
    assert "DeepSpeed" in log or "deepspeed" in log  # the engine came up in the launched worker
    # The worker wrote the trainer's arguments with the ZeRO-2 file resolved ("auto" values filled in).
    import torch

    args = torch.load(folder / "model" / "training_args.bin", weights_only=False)
    assert args.deepspeed.endswith("zero2.json") and args.hf_deepspeed_config.config["zero_optimization"]["stage"] == 2
    assert args.hf_deepspeed_config.config["train_micro_batch_size_per_gpu"] == 4

    mlflow.flush_async_logging()
    run_id = out.params["train.mlflow_run_id"]
    history = client().get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # logged by the subprocess, into the stage's run
    assert client().get_run(run_id).info.run_name == "train-sft"  # named as an in-process training's run
    assert "model/model.safetensors" in {a.path for a in client().list_artifacts(run_id, "model")}

    model = AutoModelForCausalLM.from_pretrained(folder / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_zero3_lora_merges_after_training_and_dpo_starts_from_the_sft_adapter(tmp_path):
    """Under ZeRO-3 every from_pretrained partitioned the weights (empty tensors outside the engine): merge_adapter
    and DPO's merge of its start adapter failed on 'The size of tensor a (0) must match'. In-process, one rank."""
    import json
    import os

    import torch
    from safetensors.torch import load_file

    from configs.train import DPOStageConfig, LoraSettings
    from models.loading import resolve_model_path
    from tasks.train import dpo_train, sft_train

    environ_before = set(os.environ)
    rows = json.loads((DATA / "alpaca_cherry_40.json").read_text())[:8]
    data = tmp_path / "train.messages.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                     {"role": "assistant", "content": r["output"]}]}) + "\n"
                            for r in rows))
    tiny = ModelConfig(name_or_path="tiny:0")
    common = dict(max_steps=2, save_steps=100, per_device_train_batch_size=4, max_length=128, logging_steps=1,
                  deepspeed="zero3", lora=LoraSettings(r=4, alpha=8))
    sft_dir = sft_train(data, tiny, SFTStageConfig(learning_rate=1e-2, merge_adapter=True, **common), tmp_path / "sft")
    base = load_file(Path(resolve_model_path(tiny)) / "model.safetensors")
    merged = load_file(tmp_path / "sft" / "merged" / "model.safetensors")
    assert merged.keys() == base.keys() and all(merged[k].shape == base[k].shape for k in base)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q_proj], base[q_proj])  # the trained adapter is in it

    # DPO from the SFT adapter: merged into its base at load, and merged/ written after (the adapter stacks on SFT)
    dpo = DPOStageConfig(learning_rate=1e-3, pairs_path=str(DATA / "dpo_en_20.json"), **common)
    from tasks.preferences import read_preference_pairs

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in read_preference_pairs(DATA / "dpo_en_20.json").rows))
    dpo_train(pairs, ModelConfig(name_or_path=str(sft_dir)), dpo, tmp_path / "dpo")
    result = read_train_result(tmp_path / "dpo")
    assert result["global_step"] == 2 and result["merged"] == "merged"
    stacked = load_file(tmp_path / "dpo" / "merged" / "model.safetensors")
    assert all(stacked[k].shape == base[k].shape for k in base)

    # and a model loaded in this process afterwards (the evaluation after in-process training) is whole, too
    from models.loading import load_model

    evaluated, _ = load_model(tiny)
    assert evaluated.get_parameter(q_proj).shape == base[q_proj].shape
    # nor is a later training here DeepSpeed's: its switch and accelerate's state are gone (a later full-weight DPO
    # had its reference wrapped in a DeepSpeed engine)
    from accelerate.state import PartialState

    assert "ACCELERATE_USE_DEEPSPEED" not in os.environ or "ACCELERATE_USE_DEEPSPEED" in environ_before
    assert not PartialState._shared_state
