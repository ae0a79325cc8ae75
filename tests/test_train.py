"""Training: SFT full (in the flow test) and LoRA, DPO with LoRA from the SFT model, resume after an interruption, MLflow run and
registry, preference-pair reading, config errors, and the SFT flow. All on the tiny model on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from configs.errors import ConfigError, RecordError
from configs.pipeline import load_recipe
from configs.schema import DataConfig, ModelConfig
from configs.selection import FullSelection
from configs.train import DPOStageConfig, LoraSettings, SFTFlowConfig, SFTStageConfig
from tasks.data import prepare_records, read_jsonl, write_jsonl
from tasks.preferences import read_preference_pairs
from tasks.select import baseline_selection
from tasks.store import StageOutput
from tasks.train import (TrainingInterrupted, dpo_stage, dpo_train, quantization_config, read_train_result, sft_rows,
                         sft_stage, sft_train)

from conftest import DATA

TINY = ModelConfig(name_or_path="tiny:0")
FAST = dict(per_device_train_batch_size=4, max_length=96, logging_steps=1, learning_rate=1e-3)


@pytest.fixture(scope="module")
def selection() -> StageOutput:
    records = prepare_records(DataConfig(path=str(DATA / "alpaca_demo_200.json"), limit=24))
    return baseline_selection(records, FullSelection(), "messages")


def generate(model, tokenizer) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Give three tips for staying healthy."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("*.safetensors"))))


# ------------------------------------------------------------------------------------------ SFT, plain
def test_sft_lora_saves_an_adapter_that_peft_applies_and_merges(selection, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.loading import resolve_model_path

    config = SFTStageConfig(max_steps=3, save_steps=100, lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
                            merge_adapter=True, **FAST)
    folder = sft_train(selection.file("subset.messages.jsonl"), TINY, config, tmp_path)
    assert (folder / "adapter_config.json").exists() and not (folder / "model.safetensors").exists()
    adapter = weights(folder)
    assert adapter and all("lora_" in k for k in adapter) and any("q_proj" in k for k in adapter)
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: trained

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY))
    tuned = PeftModel.from_pretrained(base, str(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generate(tuned, tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = tokenizer("What is the capital of France?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(tuned(ids).logits, merged(ids).logits, atol=1e-4)
        with tuned.disable_adapter():
            assert not torch.allclose(tuned(ids).logits, merged(ids).logits, atol=1e-4)


# ----------------------------------------------------------------- the stage: resume, MLflow, registry, DPO
@pytest.fixture(scope="module")
def parent_run():
    from tasks.track import start_parent_run

    return start_parent_run("train-tests", "train-tests", SFTStageConfig(), None)


@pytest.fixture(scope="module")
def resumed_sft(selection, parent_run):
    """A LoRA SFT stage interrupted after step 3 (checkpoint at 2), then rerun: it resumes instead of restarting."""
    config = SFTStageConfig(max_steps=5, save_steps=2, lora=LoraSettings(r=4, alpha=8), **FAST)
    with pytest.raises(TrainingInterrupted):
        sft_stage(selection, TINY, config, tracking=parent_run, interrupt_after_step=3)
    out = sft_stage(selection, TINY, config, tracking=parent_run)
    from tasks.track import log_stage_run

    log_stage_run(parent_run, out, config={"sft": config}, run_id=out.params["train.mlflow_run_id"])
    return out, config


def metric_steps(run_id: str, key: str) -> list[int]:
    from tasks.track import client

    return sorted(m.step for m in client().get_metric_history(run_id, key))


def test_rerun_of_an_interrupted_stage_resumes_from_its_checkpoint(resumed_sft, parent_run):
    from tasks.track import client

    out, _ = resumed_sft
    result = read_train_result(Path(out.path))
    assert Path(result["resumed_from"]).name == "checkpoint-2"
    assert result["global_step"] == 5 and out.metrics["train.resumed_from_step"] == 2
    # the mean loss covers all 5 steps, not only the 3 of the resumed attempt (the trainer's own training_loss)
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert len(losses) == 5 and out.metrics["train.mean_loss"] == pytest.approx(sum(losses) / 5, rel=1e-6)
    assert out.metrics["train.mean_loss"] != pytest.approx(result["train_loss"], rel=1e-6)
    # The resumed attempt logged steps 3..5 only; the interrupted attempt's run holds 1..2 and is marked FAILED.
    assert metric_steps(out.params["train.mlflow_run_id"], "loss") == [3, 4, 5]
    runs = client().search_runs([client().get_run(parent_run).info.experiment_id],
                                f"tags.pomona.stage = 'train-sft' and tags.mlflow.parentRunId = '{parent_run}'")
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1 and metric_steps(failed[0].info.run_id, "loss") == [1, 2]
    assert (Path(out.path) / "_SUCCESS").exists()


def test_the_adapter_config_is_the_same_whatever_the_hash_seed(resumed_sft, tmp_path):
    """PEFT writes target_modules from a set (order = the process's hash seed): sorted, retraining the same weights
    gives the same model/ digest, so the stages downstream of a retrained stage keep their keys."""
    from tasks.train import canonical_adapter_config

    out, _ = resumed_sft
    saved = json.loads((Path(out.path) / "model" / "adapter_config.json").read_text())
    modules = saved["target_modules"]
    assert len(modules) > 2 and modules == sorted(modules)  # all-linear on the tiny model: 7 per layer
    texts = []
    for order in (modules, modules[::-1]):
        folder = tmp_path / f"order-{len(texts)}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({**saved, "target_modules": order}))
        canonical_adapter_config(folder)
        texts.append((folder / "adapter_config.json").read_text())
    assert texts[0] == texts[1]


def test_the_stage_run_holds_params_curves_model_and_a_tagged_registry_version(resumed_sft, selection):
    import mlflow

    from tasks.track import client

    mlflow.flush_async_logging()
    out, config = resumed_sft
    mlc = client()
    run = mlc.get_run(out.params["train.mlflow_run_id"])
    assert run.data.params["sft.learning_rate"] == str(config.learning_rate)     # the stage config
    assert float(run.data.params["learning_rate"]) == config.learning_rate       # the Trainer's own arguments
    assert run.data.params["train.loss_mask"] == "assistant"
    assert len(mlc.get_metric_history(run.info.run_id, "loss")) > 1
    assert len(mlc.get_metric_history(run.info.run_id, "learning_rate")) > 1
    assert run.data.metrics["train.global_step"] == 5
    artifacts = {a.path for a in mlc.list_artifacts(run.info.run_id, "model")}
    assert {"model/adapter_config.json", "model/adapter_model.safetensors"} <= artifacts
    assert "loss_curve.png" in {a.path for a in mlc.list_artifacts(run.info.run_id)}
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["full-subset"]

    name, version = out.params["train.registered_model"], out.params["train.registered_version"]
    assert name == "train-tests-sft"
    registered = mlc.get_model_version(name, version)
    digest = selection.datasets[0]["digest"]
    assert registered.tags["selection_method"] == "full" and registered.tags["dataset_digest"] == digest
    assert registered.run_id == run.info.run_id and registered.tags["adapter"] == "true"


def test_dpo_with_lora_starts_from_the_sft_adapter_and_reloads(resumed_sft, parent_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.track import client

    sft, _ = resumed_sft
    config = DPOStageConfig(max_steps=4, save_steps=2, beta=0.1, lora=LoraSettings(r=4, alpha=8),
                            pairs_path=str(DATA / "dpo_en_20.json"), **{**FAST, "max_length": 128})
    with pytest.raises(TrainingInterrupted):  # killed after step 3: the rerun resumes from its step-2 checkpoint
        dpo_stage(None, TINY, config, sft=sft, tracking=parent_run, interrupt_after_step=3)
    out = dpo_stage(None, TINY, config, sft=sft, tracking=parent_run)
    result = read_train_result(Path(out.path))
    assert result["global_step"] == 4 and result["kind"] == "dpo" and out.metrics["dpo.pairs_kept"] == 20
    assert Path(result["resumed_from"]).name == "checkpoint-2" and out.metrics["train.resumed_from_step"] == 2
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert len(losses) == 4 and out.metrics["train.mean_loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)
    # The policy trains a fresh adapter on the merged SFT model; with the adapter disabled it IS the SFT model.
    adapter_config = json.loads((Path(out.path) / "model" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert any("rewards/chosen" in h for h in result["log_history"])
    assert len(client().get_metric_history(out.params["train.mlflow_run_id"], "rewards/margins")) >= 1

    from tasks.train import load_for_training

    sft_merged = load_for_training(ModelConfig(name_or_path=sft.params["train.model_dir"]), config, "cpu")
    start = AutoModelForCausalLM.from_pretrained(sft_merged.config._name_or_path)  # the SFT's base (tiny)
    tuned = PeftModel.from_pretrained(sft_merged, str(Path(out.path) / "model"))
    tokenizer = AutoTokenizer.from_pretrained(Path(out.path) / "model")
    generate(tuned, tokenizer)
    ids = tokenizer("Write a short poem about the sea.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(start(ids).logits, sft_merged(ids).logits, atol=1e-5)  # SFT moved the base
        # What is evaluated and registered is base + SFT + DPO: the adapter alone names the bare base, so merged/
        # is always written for a DPO adapter stacked on an SFT adapter (loading model/ dropped the SFT).
        from tasks.train import trained_model

        evaluated = trained_model(out, TINY)
        assert Path(evaluated.name_or_path).name == "merged" and "use merged/" in result["adapter_applies_to"]
        merged = AutoModelForCausalLM.from_pretrained(evaluated.name_or_path)
        assert torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-4)
        without_sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_merged.config._name_or_path),
                                                str(Path(out.path) / "model"))
        assert not torch.allclose(merged(ids).logits, without_sft(ids).logits, atol=1e-3)
    registered = client().get_model_version(out.params["train.registered_model"], out.params["train.registered_version"])
    assert registered.tags["selection_method"] == "given-pairs" and registered.tags["sft_stage_key"] == sft.key
    assert registered.source.endswith("/merged") and registered.tags["adapter"] == "false"


# --------------------------------------------------------------------------------------- preference pairs
def test_sharegpt_dpo_pairs_become_conversational_preference_rows():
    read = read_preference_pairs(DATA / "dpo_en_20.json")
    assert read.format == "sharegpt" and read.counts == {"pairs_read": 20, "pairs_kept": 20, "pairs_rejected": 0}
    raw = json.loads((DATA / "dpo_en_20.json").read_text())
    first = read.rows[0]
    assert first["prompt"] == [{"role": "user", "content": raw[0]["conversations"][0]["value"]}]
    assert first["chosen"] == [{"role": "assistant", "content": raw[0]["chosen"]["value"]}]
    assert first["rejected"] == [{"role": "assistant", "content": raw[0]["rejected"]["value"]}]
    assert all(r["prompt"][-1]["role"] == "user" for r in read.rows)
    assert max(len(r["prompt"]) for r in read.rows) > 1  # multi-turn prompts keep their history


def test_a_sharegpt_dpo_pairs_top_level_system_prompt_leads_its_prompt(tmp_path):
    row = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Name a colour."}],
           "chosen": {"from": "gpt", "value": "Blue."}, "rejected": {"from": "gpt", "value": "No."}}
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [row])
    assert read_preference_pairs(path).rows[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "Name a colour."}]
    row["conversations"].insert(0, {"from": "system", "value": "Be kind."})
    write_jsonl(path, [row])
    with pytest.raises(RecordError, match="field 'system': a top-level system prompt and a system turn"):
        read_preference_pairs(path)


def test_sharegpt_pair_answers_take_every_assistant_role_name_a_conversation_takes(tmp_path):
    """`chatgpt` / `bing` / `bard` / `bot` answer as `gpt` does in conversations; `chosen` and `rejected` read them
    the same way (they were refused as "expected 'gpt'"), and a user turn there is still a named error."""
    row = {"conversations": [{"from": "human", "value": "Name a colour."}],
           "chosen": {"from": "chatgpt", "value": "Blue."}, "rejected": {"from": "bing", "value": "No."}}
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, [row, {**row, "rejected": {"from": "human", "value": "No."}}])
    read = read_preference_pairs(path, on_error="skip")
    assert read.rows == [{"prompt": [{"role": "user", "content": "Name a colour."}],
                          "chosen": [{"role": "assistant", "content": "Blue."}],
                          "rejected": [{"role": "assistant", "content": "No."}]}]
    assert [(r["location"], r["field"]) for r in read.rejects] == [("line 2", "rejected.from")]
    assert "'human'" in read.rejects[0]["reason"] and "chatgpt" in read.rejects[0]["reason"]


def test_grape_pairs_and_bad_rows_name_file_record_and_field(tmp_path):
    good = {"prompt": [{"role": "user", "content": "Name a colour."}],
            "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "No."}]}
    rows = [good,
            {**good, "chosen": [{"role": "user", "content": "Blue."}]},
            {**good, "rejected": good["chosen"]},
            {**good, "prompt": good["prompt"] + good["chosen"]},
            {k: v for k, v in good.items() if k != "rejected"}]
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, rows)
    with pytest.raises(RecordError) as err:
        read_preference_pairs(path)
    assert str(path) in str(err.value) and "line 2" in str(err.value) and "chosen[0].role" in str(err.value)
    read = read_preference_pairs(path, on_error="skip")
    assert read.format == "grape" and read.rows == [good]
    assert [(r["location"], r["field"]) for r in read.rejects] == [
        ("line 2", "chosen[0].role"), ("line 3", "rejected"), ("line 4", "prompt"), ("line 5", "rejected")]
    assert "identical" in read.rejects[1]["reason"] and "missing" in read.rejects[3]["reason"]


# ------------------------------------------------------------------------------------------------ configs
def test_configs_refuse_impossible_combinations(tmp_path):
    with pytest.raises(ValueError, match="qlora needs a 'lora'"):
        SFTStageConfig(qlora=True)
    with pytest.raises(ValueError, match="merge_adapter needs 'lora'"):
        SFTStageConfig(merge_adapter=True)
    with pytest.raises(ValueError, match="torchrun"):
        SFTStageConfig(num_processes=2)
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("name: x\ndata: {path: d.json}\nmodel: {name_or_path: 'tiny:0'}\nsft: {learning_rat: 0.1}\n")
    with pytest.raises(ConfigError, match="sft.learning_rat"):
        load_recipe(recipe, SFTFlowConfig)
    recipe.write_text("name: x\ndata: {path: d.json}\nmodel: {name_or_path: 'tiny:0'}\n"
                      "sft: {deepspeed: zero3, lora: {r: 8}, max_steps: 10}\n")
    loaded = load_recipe(recipe, SFTFlowConfig)
    assert loaded.sft.deepspeed_file().endswith("configs/deepspeed/zero3.json") and loaded.sft.lora.r == 8
    assert loaded.sft.trl_arguments()["max_steps"] == 10 and loaded.sft.assistant_only_loss is True
    with pytest.raises(ConfigError, match="qlora needs CUDA"):
        quantization_config("cpu", torch.float32)


def alive(pid: int) -> bool:
    """An orphan is reparented to PID 1 (or a subreaper), which may not reap it promptly: a zombie has exited."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:  # reaped between the two looks
        return False


def test_more_launched_workers_than_gpus_is_refused_before_launching(tmp_path, monkeypatch):
    import tasks.train as train

    monkeypatch.setattr(train, "training_device", lambda model: "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    launched = []
    monkeypatch.setattr(train.subprocess, "Popen", lambda *args, **kwargs: launched.append(args))
    config = SFTStageConfig(launcher="torchrun", num_processes=4)
    with pytest.raises(ConfigError, match="num_processes 4 but 2 GPU"):
        train.train_subprocess("sft", tmp_path / "d.jsonl", TINY, config, tmp_path / "out")
    assert not launched
    train.refuse_more_processes_than_gpus(TINY, config.model_copy(update={"num_processes": 2}))  # fits


def test_an_interrupted_launched_training_stops_the_launcher_and_its_ranks(tmp_path, monkeypatch):
    """Ctrl-C reaches the launcher through the terminal, but a SIGTERM to pomona, or a cancelled flow, does not:
    the launcher and its ranks trained on, holding the GPUs, after the stage had failed."""
    import sys
    import time

    import tasks.train as train

    rank_pid = tmp_path / "rank.pid"
    launcher = ("import subprocess, sys, time\n"
                "rank = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
                f"open({str(rank_pid)!r}, 'w').write(str(rank.pid))\n"
                "print('training', flush=True)\n"
                "time.sleep(300)\n")
    monkeypatch.setattr(train, "launch_command", lambda *args: [sys.executable, "-c", launcher])

    class InterruptedTerminal:  # the interrupt lands while the stage relays the launcher's output
        def write(self, text):
            if "training" in text:
                raise KeyboardInterrupt("stopped")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", InterruptedTerminal())
    with pytest.raises(KeyboardInterrupt):
        train.train_subprocess("sft", tmp_path / "d.jsonl", TINY, SFTStageConfig(launcher="torchrun"), tmp_path / "out")
    monkeypatch.undo()
    assert "training" in (tmp_path / "out" / "launcher.log").read_text()
    rank = int(rank_pid.read_text())
    deadline = time.monotonic() + 10
    while alive(rank) and time.monotonic() < deadline:  # the rank is the init process's child now
        time.sleep(0.1)
    assert not alive(rank)


@pytest.mark.parametrize("launcher_exits", [False, True], ids=["launcher running", "launcher already gone"])
def test_stopping_a_launch_kills_a_rank_in_a_session_of_its_own_that_ignores_sigterm(tmp_path, launcher_exits):
    """torchrun starts each rank in a session of its own: the SIGKILL to the launcher's group missed a rank that
    ignored the SIGTERM, and it lived on as an orphan holding its GPU memory. A launcher that already died left its
    ranks reparented, out of its process tree: they are found by the launch's tag in their environment."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tasks.train import LAUNCH_ID_ENV, stop_process_group

    rank_pid = tmp_path / "rank.pid"
    rank_code = ("import os, signal, sys, time\n"
                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                 "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
                 "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
                 "time.sleep(60)\n")
    launcher = ("import os, subprocess, sys, time\n"
                f"subprocess.Popen([sys.executable, '-c', {rank_code!r}, {str(rank_pid)!r}], start_new_session=True)\n"
                f"while {launcher_exits} and not os.path.exists({str(rank_pid)!r}): time.sleep(0.05)\n"
                f"os._exit(0) if {launcher_exits} else time.sleep(60)\n")
    launch_id = f"test-{os.getpid()}-{time.time_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", launcher], start_new_session=True,
                            env={**os.environ, LAUNCH_ID_ENV: launch_id})
    rank = None
    try:
        deadline = time.monotonic() + 10
        while not rank_pid.exists() and time.monotonic() < deadline:  # written once SIGTERM is ignored
            time.sleep(0.05)
        rank = int(rank_pid.read_text())
        assert os.getsid(rank) != os.getsid(proc.pid)
        if launcher_exits:
            deadline = time.monotonic() + 10
            while alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        stop_process_group(proc, grace_s=1.0, launch_id=launch_id)
        deadline = time.monotonic() + 2
        while alive(rank) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(rank)
    finally:
        proc.kill()
        proc.wait()
        if rank is not None and alive(rank):  # no orphan left behind by a failing run
            os.kill(rank, signal.SIGKILL)


def test_deepspeed_files_leave_batch_and_precision_to_the_trainer():
    from configs.train import DEEPSPEED_FILES

    for stage, path in DEEPSPEED_FILES.items():
        ds = json.loads(path.read_text())
        assert ds["zero_optimization"]["stage"] == int(stage[-1])
        assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == "auto"
        assert ds["bf16"]["enabled"] == "auto"


def test_a_template_without_generation_markers_is_said_not_silently_masked(selection):
    from models.loading import load_tokenizer

    tokenizer = load_tokenizer(TINY)
    path = selection.file("subset.messages.jsonl")
    rows, mask = sft_rows(path, tokenizer, SFTStageConfig())
    assert mask == "assistant" and "messages" in rows[0]
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    rows, mask = sft_rows(path, tokenizer, SFTStageConfig())
    assert mask == "completion" and rows[0]["completion"][0]["role"] == "assistant"
    assert rows[0]["prompt"][-1]["role"] == "user"
    with pytest.raises(ConfigError, match="generation"):
        sft_rows(path, tokenizer, SFTStageConfig(without_generation_markers="raise"))
    rows, mask = sft_rows(path, tokenizer, SFTStageConfig(assistant_only_loss=False))
    assert mask == "all"


def test_text_prompt_completion_rows_train_on_the_completion(tmp_path):
    from models.loading import load_tokenizer

    tokenizer = load_tokenizer(TINY)
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "Add 2 and 2\\n\\n### Response:", "completion": "4"}\n'
                    '{"prompt": "Name a colour\\n\\n### Response:", "completion": "Blue"}\n')
    rows, mask = sft_rows(path, tokenizer, SFTStageConfig())
    assert mask == "completion" and rows[1] == {"prompt": "Name a colour\n\n### Response:", "completion": "Blue"}
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                    '{"prompt": "no completion"}\n')
    with pytest.raises(ConfigError, match="line 2: field 'messages'"):
        sft_rows(path, tokenizer, SFTStageConfig())


# ---------------------------------------------------------------------------------------------- the flow
def test_sft_flow_trains_logs_and_reuses_the_stage(prefect_server, tmp_path):
    from flows.train import sft
    from tasks.track import client

    config = SFTFlowConfig(name="sft-flow-test", data=DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=8),
                           model=TINY, sft=SFTStageConfig(max_steps=2, save_steps=100, **FAST))
    first = sft(config)["sft"]
    again = sft(config)["sft"]
    assert again.digest == first.digest and again.path == first.path
    mlc = client()
    exp = mlc.get_experiment_by_name("sft-flow-test")
    runs = mlc.search_runs([exp.experiment_id], "tags.pomona.stage = 'train-sft'")
    assert sorted(r.data.tags["pomona.cached"] for r in runs) == ["false", "true"]
    trained = next(r for r in runs if r.data.tags["pomona.cached"] == "false")
    assert trained.info.run_id == first.params["train.mlflow_run_id"]
    assert trained.data.params["sft.max_steps"] == "2" and "loss" in trained.data.metrics
    reused = next(r for r in runs if r.data.tags["pomona.cached"] == "true")
    assert reused.data.tags["pomona.trained_in_run"] == trained.info.run_id
    # the reused run names the subset as the trainer's does (a search by tags.dataset_digest missed it)
    for key in ("selection_method", "selection_stage", "dataset_digest"):
        assert reused.data.tags[key] == trained.data.tags[key]

    # A full fine-tune: every weight file is rewritten, and the folder reloads as a plain causal LM.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.loading import resolve_model_path

    folder = Path(first.path) / "model"
    result = read_train_result(Path(first.path))
    assert result["global_step"] == 2 and result["loss_mask"] == "assistant" and result["adapter"] is False
    assert [h["step"] for h in result["log_history"] if "loss" in h] == [1, 2]
    before, after = weights(Path(resolve_model_path(TINY))), weights(folder)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    generate(AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder))


def test_dpo_flow_trains_on_a_pairs_file_under_its_own_parent_run(prefect_server):
    from configs.train import DPOFlowConfig
    from flows.train import dpo
    from tasks.track import client

    config = DPOFlowConfig(name="dpo-flow-test", model=TINY,
                           dpo=DPOStageConfig(max_steps=2, save_steps=100, lora=LoraSettings(r=4, alpha=8),
                                              pairs_path=str(DATA / "dpo_en_20.json"), **{**FAST, "max_length": 128}))
    out = dpo(config)
    result = read_train_result(Path(out.path))
    assert result["kind"] == "dpo" and result["global_step"] == 2 and out.metrics["dpo.pairs_kept"] == 20
    mlc = client()
    runs = mlc.search_runs([mlc.get_experiment_by_name("dpo-flow-test").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "dpo-flow-test")
    child = next(r for r in runs if r.data.tags.get("pomona.stage") == "train-dpo")
    assert parent.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "loss" in child.data.metrics and child.data.params["dpo.beta"] == "0.1"


def test_full_fine_tuning_keeps_float32_weights_under_bf16_autocast():
    """dtype 'auto' on CUDA: the trainer autocasts to bf16, the weights it updates stay float32 (bf16 weights lose
    most updates at small learning rates); a LoRA base stays in the compute dtype; an explicit dtype is kept."""
    from tasks.train import training_weights_dtype

    full, lora = SFTStageConfig(), SFTStageConfig(lora=LoraSettings(r=4, alpha=8))
    assert training_weights_dtype(TINY, full, "cuda") == torch.float32
    assert training_weights_dtype(TINY, lora, "cuda") == torch.bfloat16
    assert training_weights_dtype(TINY.model_copy(update={"dtype": "bfloat16"}), full, "cuda") == torch.bfloat16
    assert training_weights_dtype(TINY, lora, "cpu") == torch.float32


def test_full_fine_tuning_in_float16_on_cuda_gives_the_gradient_scaler_float32_weights():
    """dtype 'float16' on CUDA turns on the trainer's fp16 mixed precision, whose gradient scaler refuses float16
    gradients: with float16 weights a full fine-tune failed its first optimizer step. The scaler's check is the
    same on CPU, so it runs here on the weights' dtype; a LoRA base stays float16 (PEFT's adapters are float32)."""
    from tasks.train import training_weights_dtype

    half = TINY.model_copy(update={"dtype": "float16"})
    dtype = training_weights_dtype(half, SFTStageConfig(), "cuda")
    weight = torch.nn.Parameter(torch.ones(3, dtype=dtype))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale((weight.float() * 2).sum()).backward()
    scaler.unscale_(optimizer)  # float16 weights: ValueError "Attempting to unscale FP16 gradients."
    scaler.step(optimizer)
    assert dtype == torch.float32 and bool((weight < 1).all())
    assert training_weights_dtype(half, SFTStageConfig(lora=LoraSettings(r=4, alpha=8)), "cuda") == torch.float16
    assert training_weights_dtype(half, SFTStageConfig(), "cpu") == torch.float16  # no autocast on CPU: as asked


def test_resume_skips_a_checkpoint_cut_off_while_saving(tmp_path):
    """The Trainer writes trainer_state.json last: a checkpoint without it (or with it cut short) was being saved
    when the run died, and resuming from it failed on every rerun."""
    from tasks.train import CHECKPOINT_DIR, last_checkpoint

    assert last_checkpoint(tmp_path) is None
    root = tmp_path / CHECKPOINT_DIR
    for step, state in [(2, '{"global_step": 2}'), (10, '{"global_step": 10}'), (12, None), (14, '{"global_st')]:
        (root / f"checkpoint-{step}").mkdir(parents=True)
        (root / f"checkpoint-{step}" / "model.safetensors").write_text("w")
        if state is not None:
            (root / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (root / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == str(root / "checkpoint-10")  # 10 < 12 < 14 numerically, not as text


def test_full_weight_dpo_trains_every_weight_of_a_merged_lora_sft(resumed_sft, parent_run):
    sft, _ = resumed_sft
    config = DPOStageConfig(max_steps=2, save_steps=100, beta=0.1, pairs_path=str(DATA / "dpo_en_20.json"),
                            **{**FAST, "max_length": 128})
    from tasks.train import load_for_training

    start = load_for_training(ModelConfig(name_or_path=sft.params["train.model_dir"]), config, "cpu")
    assert all(p.requires_grad for p in start.parameters())  # PEFT's merge left the base frozen
    out = dpo_stage(None, TINY, config, sft=sft, tracking=parent_run)
    tuned = weights(Path(out.path) / "model")
    before = start.state_dict()
    moved = [k for k, v in tuned.items() if k in before and not torch.allclose(v.float(), before[k].float())]
    assert len(moved) > len(tuned) // 2, moved  # a full-weight stage, not an adapter


def test_full_weight_dpo_from_a_lora_sft_adapter_is_held_to_the_sft_model_not_the_bare_base(tmp_path, monkeypatch):
    """TRL loads a full-weight DPO's reference from the policy's config name, which after merging the SFT adapter
    named the bare base: the reference was the model before SFT."""
    import trl

    from tasks.train import load_for_training

    data = tmp_path / "train.messages.jsonl"
    write_jsonl(data, [{"messages": [{"role": "user", "content": r["instruction"]},
                                     {"role": "assistant", "content": r["output"]}]}
                       for r in json.loads((DATA / "alpaca_cherry_40.json").read_text())[:8]])
    adapter = sft_train(data, TINY, SFTStageConfig(max_steps=2, save_steps=100, lora=LoraSettings(r=4, alpha=8),
                                                   **{**FAST, "learning_rate": 1e-2}), tmp_path / "sft")
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, read_preference_pairs(DATA / "dpo_en_20.json").rows[:4])
    trainers = []

    class Recorded(trl.DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(trl, "DPOTrainer", Recorded)
    config = DPOStageConfig(max_steps=1, save_steps=100, **{**FAST, "max_length": 128})
    start = ModelConfig(name_or_path=str(adapter))
    dpo_train(pairs, start, config, tmp_path / "dpo")
    sft_model = load_for_training(start, config, "cpu").state_dict()
    reference = trainers[0].ref_model.state_dict()
    assert all(torch.equal(reference[k], sft_model[k]) for k in sft_model)


def test_a_run_that_reuses_a_stage_another_run_trained_logs_its_own_cached_child_run(selection, prefect_server):
    """Two runs of one stage at once: the second waits on the stage lock and reuses the folder before the first has
    logged its training run. It must not log into (and claim) the first run's training run."""
    from flows.train import run_training_stage
    from tasks.track import client, start_parent_run
    from tasks.train import sft_stage_task

    config = SFTStageConfig(max_steps=1, save_steps=100, **{**FAST, "learning_rate": 2e-3})  # a stage of its own
    first_parent = start_parent_run("train-race", "first", config, None)
    second_parent = start_parent_run("train-race", "second", config, None)
    trained = sft_stage(selection, TINY, config, tracking=first_parent)  # trained, not yet logged by its run
    trained_in = trained.params["train.mlflow_run_id"]
    reused = run_training_stage(sft_stage_task, selection, TINY, config, parent_run_id=second_parent)
    assert reused.path == trained.path
    mlc = client()
    runs = mlc.search_runs([mlc.get_experiment_by_name("train-race").experiment_id],
                           f"tags.mlflow.parentRunId = '{second_parent}'")
    assert len(runs) == 1 and runs[0].info.run_id != trained_in
    assert runs[0].data.tags["pomona.cached"] == "true" and runs[0].data.tags["pomona.trained_in_run"] == trained_in
    trainer = mlc.get_run(trained_in)
    assert trainer.data.tags["mlflow.parentRunId"] == first_parent and "pomona.logged" not in trainer.data.tags


def _sharegpt_messages(tmp_path) -> Path:
    """The real ShareGPT slice's usable conversations as a training file (long multi-turn ones among them)."""
    from tasks.data import read_records

    records = read_records(DATA / "sharegpt_v3_41.json", on_error="skip").records
    path = tmp_path / "sharegpt.messages.jsonl"
    write_jsonl(path, [{"messages": r.messages} for r in records])
    return path


def test_sft_counts_and_lists_the_conversations_truncation_leaves_nothing_to_train_on(tmp_path):
    """TRL drops an example whose trained tokens all lie past max_length (a long first turn of a ShareGPT
    conversation): the stage said it trained on all 25, and nothing named the 11 it never saw."""
    from models.loading import load_tokenizer

    data = _sharegpt_messages(tmp_path)
    config = SFTStageConfig(max_steps=1, save_steps=100, **{**FAST, "max_length": 96})
    sft_train(data, TINY, config, tmp_path / "out")
    info = read_train_result(tmp_path / "out")
    rejects = [json.loads(line) for line in (tmp_path / "out" / "train_rejects.jsonl").read_text().splitlines()]
    assert info["examples_given"] == 27 and info["examples_dropped"] == len(rejects) == 11
    assert info["examples"] == 16 and 0 < info["examples_at_max_length"] <= 16
    # each listed one really has its first assistant token beyond the cut; each trained one has it within
    tokenizer = load_tokenizer(TINY)
    rows = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    first_answer = [len(tokenizer.apply_chat_template(m[:next(i for i, t in enumerate(m) if t["role"] == "assistant")],
                                                      add_generation_prompt=True, return_dict=True)["input_ids"])
                    for m in rows]
    listed = {r["line"] for r in rejects}
    assert listed == {n + 1 for n, start in enumerate(first_answer) if start >= 96}
    assert all(r["row"]["messages"] == rows[r["line"] - 1] and "max_length=96" in r["reason"] for r in rejects)
    only_long = tmp_path / "long.messages.jsonl"
    write_jsonl(only_long, [{"messages": r["row"]["messages"]} for r in rejects])
    with pytest.raises(ConfigError, match=r"all 11 training examples lose every trained token .*sft.max_length=96"):
        sft_train(only_long, TINY, config, tmp_path / "none")


def test_dpo_counts_and_lists_the_pairs_whose_prompt_fills_max_length(tmp_path):
    """TRL's DPO drops a pair whose prompt alone fills max_length: with the bundled ShareGPT pairs at the tiny
    recipes' max_length 256, 10 of 20 were dropped while the stage reported 20 examples."""
    from models.loading import load_tokenizer

    rows = read_preference_pairs(DATA / "dpo_en_20.json").rows
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, rows)
    tokenizer = load_tokenizer(TINY)
    prompt_tokens = [len(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=True)
                         ["input_ids"]) for r in rows]
    config = DPOStageConfig(max_steps=1, save_steps=100, per_device_train_batch_size=4, max_length=256)
    dpo_train(path, TINY, config, tmp_path / "out")
    info = read_train_result(tmp_path / "out")
    rejects = read_jsonl(tmp_path / "out" / "train_rejects.jsonl")
    assert {r["line"] for r in rejects} == {n + 1 for n, t in enumerate(prompt_tokens) if t >= 256}
    assert info["examples_given"] == 20 and info["examples_dropped"] == len(rejects) == 10 and info["examples"] == 10
    assert all(r["stage"] == "train-dpo" and "dpo.max_length=256" in r["reason"] for r in rejects)


def test_a_chat_template_that_refuses_a_system_turn_names_the_example_before_trl_does(tmp_path):
    """ShareGPT conversations may open with a system turn; Gemma-style templates raise on it, and TRL died inside
    datasets.map with a Jinja traceback naming no example."""
    from models.loading import load_tokenizer

    path = _sharegpt_messages(tmp_path)
    rows = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
    with_system = [n + 1 for n, m in enumerate(rows) if m[0]["role"] == "system"]
    assert len(with_system) == 5
    tokenizer = load_tokenizer(TINY)
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}" + tokenizer.chat_template)
    with pytest.raises(ConfigError, match=rf"line {with_system[0]}: the model's chat template refuses this "
                                          r"conversation \(roles \['system', 'user', 'assistant'\]\): System role not "
                                          r"supported; 5 of 27 training examples are refused"):
        sft_rows(path, tokenizer, SFTStageConfig())


def test_dpo_pairs_a_template_refuses_are_a_config_error_naming_the_line(tmp_path, monkeypatch):
    import models.loading

    rows = read_preference_pairs(DATA / "dpo_en_20.json").rows  # real ShareGPT pairs, some with a system prompt
    with_system = [n + 1 for n, r in enumerate(rows) if r["prompt"][0]["role"] == "system"]
    assert with_system
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, rows)
    real = models.loading.load_tokenizer

    def refusing(*args, **kwargs):
        tok = real(*args, **kwargs)
        tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                             "supported') }}{% endif %}" + tok.chat_template)
        return tok

    monkeypatch.setattr(models.loading, "load_tokenizer", refusing)
    with pytest.raises(ConfigError, match=rf"pairs.jsonl, line {with_system[0]}: the model's chat template refuses "
                                          r"this conversation \(roles \['system', 'user', 'assistant'\]\): System "
                                          rf"role not supported; {len(with_system)} of 20 training examples are refused"):
        dpo_train(path, TINY, DPOStageConfig(max_steps=1, per_device_train_batch_size=4, max_length=256),
                  tmp_path / "out")


def test_a_conversation_holding_a_special_tokens_text_is_listed_not_trained_on(tmp_path):
    """Two ShareGPT V3 replies end in the text '...Skipped 1 messages<|endoftext|>': GPT-2-family and SmolLM2
    tokenizers read it as the end-of-text control token, mid-conversation. Here the tiny tokenizer's own '<|end|>'
    stands in for it."""
    data = _sharegpt_messages(tmp_path)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[4]["messages"][-1]["content"] += "\n\nSkipped 1 messages<|end|>"
    write_jsonl(data, rows)
    config = SFTStageConfig(max_steps=1, save_steps=100, **{**FAST, "max_length": 96})
    sft_train(data, TINY, config, tmp_path / "out")
    info = read_train_result(tmp_path / "out")
    rejects = read_jsonl(tmp_path / "out" / "train_rejects.jsonl")
    special = [r for r in rejects if r["reason"].startswith("special token in the text")]
    assert [r["line"] for r in special] == [5] and "'<|end|>'" in special[0]["reason"]
    assert info["examples_special_tokens"] == 1 and info["examples_given"] == 27
    assert info["examples"] == 27 - 1 - info["examples_dropped"]
    assert [r["line"] for r in rejects] == sorted(r["line"] for r in rejects)


def test_the_same_lora_sft_in_two_homes_has_one_digest_and_loads_after_the_home_moved(selection, tmp_path,
                                                                                         monkeypatch):
    """PEFT writes the base model's absolute path (here the tiny model in the store) into adapter_config.json and
    the adapter README: the train stage's digest names it store-relative, so the same training in two homes is
    one digest and the downstream stage keys match; the adapter still loads from its stage folder after the home
    moved (the old home gone)."""
    import shutil

    from models.loading import load_model
    from tasks.store import stage_key
    from tasks.train import MODEL_DIR, load_weights

    config = SFTStageConfig(max_steps=1, save_steps=100, lora=LoraSettings(r=4, alpha=8), **FAST)
    outs = []
    for home in ("home-a", "home-b"):
        monkeypatch.setenv("POMONA_HOME", str(tmp_path / home))
        outs.append(sft_stage(selection, TINY, config))
    a, b = outs
    recorded = [json.loads(Path(o.file(MODEL_DIR), "adapter_config.json").read_text())["base_model_name_or_path"]
                for o in outs]
    assert recorded[0] != recorded[1] and str(tmp_path / "home-a") in recorded[0]  # PEFT's path, as PEFT wrote it
    assert a.key == b.key and a.digest == b.digest
    assert stage_key("eval", {"n": 1}, [a]) == stage_key("eval", {"n": 1}, [b])

    # home-a moved to home-c: its adapter finds its base in home-c's store
    shutil.move(tmp_path / "home-a", tmp_path / "home-c")
    monkeypatch.setenv("POMONA_HOME", str(tmp_path / "home-c"))
    adapter = tmp_path / "home-c" / "store" / "train-sft" / a.key / MODEL_DIR
    merged = load_weights(adapter, {"dtype": torch.float32})
    model, _ = load_model(ModelConfig(name_or_path=str(adapter)))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, model(ids).logits, atol=1e-4)


def test_a_pairs_file_whose_every_row_is_rejected_fails_naming_it_and_the_reasons(tmp_path):
    # it used to train on: DPO died after loading the model, naming the store's empty pairs.jsonl and no reason
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
         "rejected": {"from": "gpt", "value": "a"}},
        {"conversations": [{"from": "human", "value": "q2"}], "chosen": {"from": "gpt", "value": "b"}},
    ]) + "\n")
    config = DPOStageConfig(max_steps=1, pairs_path=str(path), on_error="skip")
    with pytest.raises(RecordError, match=r"pairs.jsonl, whole file: all 2 preference rows read were rejected "
                                          r"\(chosen and rejected are identical 1, missing field 1\)") as err:
        dpo_stage(None, ModelConfig(name_or_path="/nonexistent-model"), config, tracking=None)
    assert err.value.file == str(path) and "rejects.jsonl" in err.value.reason
    path.write_text("")
    with pytest.raises(RecordError, match=r"whole file: no preference pairs in it"):
        dpo_stage(None, ModelConfig(name_or_path="/nonexistent-model"), config, tracking=None)
