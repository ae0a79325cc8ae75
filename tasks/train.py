"""Training: TRL SFT and DPO on a selected subset, with PEFT, DeepSpeed and a launcher; logged and resumable.

Two layers, as everywhere in pomona:
- `sft_train` / `dpo_train`: plain functions (data file, base model, stage config, output folder) -> the saved
  model folder. Checkpoints go to `<out_dir>/checkpoints`; when a previous attempt left some there, training
  resumes from the last one (`resume_from_checkpoint`) instead of step 0. Metrics go to the active MLflow run
  (in-process) or, for `torchrun` / `accelerate launch` subprocesses, to the run named by `MLFLOW_RUN_ID`.
- `sft_stage` / `dpo_stage`: content-addressed stages on `tasks.store.run_stage`. They open the stage's MLflow child
  run before training (so the Trainer's loss and learning-rate curves land in it), log the model folder as an
  artifact and register it in the model registry with the selection method and dataset digest as tags.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal

from configs.errors import ConfigError, ModelLoadError, RecordError
from configs.schema import ModelConfig
from configs.train import ACCELERATE_FILES, DPOStageConfig, SFTStageConfig, TrainStageConfig
from models.special_tokens import special_token_reason, special_tokens_in_text
from tasks.data import read_jsonl, reject_counts, write_jsonl
from tasks.runner import INTERRUPTIBLE_STEP_S, wait_in_short_steps
from tasks.store import (StageOutput, atomic_write_text, file_digest, portable_model_digest, run_stage,
                         stage_task)

log = logging.getLogger(__name__)

Kind = Literal["sft", "dpo"]
REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = "model"
MERGED_DIR = "merged"
CHECKPOINT_DIR = "checkpoints"
RESULT_FILE = "train_result.json"
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Distributed variables DeepSpeed needs even for one process (without them it looks for MPI and fails).
DISTRIBUTED_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What torch.distributed reads from the environment; an in-process DeepSpeed training leaves them set in this
process, and a launched training or any other child must not inherit them (the launcher sets its own)."""


# ------------------------------------------------------------------------------------------------- data
def has_generation_markers(tokenizer) -> bool:
    """True when the chat template marks assistant text with {% generation %} (what assistant_only_loss needs)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(template) and bool(_GENERATION_MARKER.search(template))


def sft_rows(messages_path: Path, tokenizer, config: SFTStageConfig) -> tuple[list[dict], str]:
    """Rows for SFTTrainer and how the loss is masked ('assistant', 'completion' or 'all').

    `messages` rows go through the chat template. `assistant_only_loss` needs generation markers in it; without
    them the recipe decides: raise, or train on prompt/completion rows (loss on the final assistant reply only),
    said in the log and in MLflow. Plain-text `prompt`/`completion` rows (a reference template's text, as Cherry's
    pre-experience trains) are trained as they are, loss on the completion (TRL appends EOS to it).
    """
    raw = read_jsonl(messages_path)
    if not raw:
        raise ConfigError(f"{messages_path}: no training examples")
    if all(isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str) for row in raw):
        return [{"prompt": row["prompt"], "completion": row["completion"]} for row in raw], "completion"
    for line, row in enumerate(raw, 1):
        if not isinstance(row.get("messages"), list):
            raise ConfigError(f"{messages_path}, line {line}: field 'messages' (a list of turns) is missing; rows "
                              "are either chat `messages` or text `prompt` + `completion`")
    rows = [{"messages": row["messages"]} for row in raw]
    refuse_untemplatable([row["messages"] for row in rows], tokenizer, messages_path)
    if not config.assistant_only_loss:
        return rows, "all"
    if has_generation_markers(tokenizer):
        return rows, "assistant"
    if config.without_generation_markers == "raise":
        raise ConfigError(
            "assistant_only_loss is on but the model's chat template has no {% generation %} markers; set "
            "`without_generation_markers: prompt_completion` (loss on the final reply) or `assistant_only_loss: false`")
    log.warning("chat template has no {%% generation %%} markers: training on prompt/completion rows, "
                "loss on the final assistant reply only (%d examples)", len(rows))
    return [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows], "completion"


ROW_COLUMN = "pomona_row"
TRAIN_REJECTS = "train_rejects.jsonl"


def numbered_rows(rows: list[dict], skip: Iterable[int] = ()) -> list[dict]:
    """The rows (less those in `skip`) with their index in an extra column, which TRL's preparation carries along:
    what it drops can be named (it silently filters examples that truncation left without a trained token)."""
    skipped = set(skip)
    return [{**row, ROW_COLUMN: i} for i, row in enumerate(rows) if i not in skipped]


def truncation_counts(prepared, given: list[int], max_length: int) -> tuple[list[int], int | None]:
    """(indices of the given rows TRL dropped, how many kept ones fill max_length: cut, or exactly that long; None
    where the prepared rows are not cut yet, as DPO's, which its collator cuts).

    A long multi-turn conversation whose first trained token lies beyond `max_length` (a long first user turn, or
    every assistant turn but the last when only the final reply is trained; for DPO a prompt that fills it) has
    nothing left to learn after the cut, and TRL drops it without a word. Packing neither truncates nor drops (and
    does not keep the column)."""
    if ROW_COLUMN not in prepared.column_names:
        return [], None
    kept = set(prepared[ROW_COLUMN])
    at_max = (sum(1 for ids in prepared["input_ids"] if len(ids) >= max_length)
              if "input_ids" in prepared.column_names else None)
    return [i for i in given if i not in kept], at_max


def account_for_dropped(trainer, rows: list[dict], special: dict[int, str], kind: Kind, config: TrainStageConfig,
                        data_path: Path, out_dir: Path, what: str, info: dict[str, Any]) -> list[dict]:
    """Count, list (`train_rejects.jsonl`) and warn about the rows left out: those holding a special token's text
    (`special`, never given to TRL) and those TRL dropped after truncation; refuse a run where none is left (torch's
    sampler would fail on an empty dataset with a message about num_samples). Returns the rows trained on."""
    passed = [i for i in range(len(rows)) if i not in special]
    dropped, at_max = truncation_counts(trainer.train_dataset, passed, config.max_length)
    setting = f"{kind}.max_length={config.max_length}"
    if len(dropped) == len(passed):
        raise ConfigError(f"{data_path}: all {len(passed)} training examples lose every trained token when cut to "
                          f"{setting} ({what}), so nothing is left to train on: raise {kind}.max_length")
    info.update(examples_given=len(rows), examples_dropped=len(dropped), examples_special_tokens=len(special))
    if at_max is not None:
        info["examples_at_max_length"] = at_max
    if dropped:
        log.warning("%d of %d %s training examples lose every trained token when cut to %s and are not trained on "
                    "(listed in %s)", len(dropped), len(rows), kind, setting, TRAIN_REJECTS)
    if trainer.is_world_process_zero():
        listed = [{"line": i + 1, "stage": f"train-{kind}", "reason": special_token_reason(token), "row": rows[i]}
                  for i, token in special.items()]
        listed += [{"line": i + 1, "stage": f"train-{kind}", "reason": f"fully masked after truncation: cut to "
                    f"{setting}, no trained token is left ({what})", "row": rows[i]} for i in dropped]
        write_jsonl(out_dir / TRAIN_REJECTS, sorted(listed, key=lambda r: r["line"]))
    gone = set(dropped) | set(special)
    return [row for i, row in enumerate(rows) if i not in gone]


def screen_special_tokens(rows: list[dict], tokenizer, kind: Kind, data_path: Path) -> dict[int, str]:
    """The rows holding a special token's text (see `special_tokens_in_text`); all of them is a ConfigError."""
    special = special_tokens_in_text(rows, tokenizer)
    if special:
        log.warning("%d of %d %s training examples hold a special token's text and are not trained on (listed in "
                    "%s)", len(special), len(rows), kind, TRAIN_REJECTS)
    if rows and len(special) == len(rows):
        line, token = next(iter(special.items()))
        raise ConfigError(f"{data_path}: all {len(rows)} training examples hold a special token's text (line "
                          f"{line + 1}: {token!r}), so nothing is left to train on")
    return special


def refuse_untemplatable(conversations: list[list[dict]], tokenizer, path: Path) -> None:
    """A chat template may refuse a conversation by raising (Gemma's and Mistral's refuse a system message, which
    ShareGPT conversations carry as a first turn); TRL then dies inside `datasets.map` with a Jinja traceback that
    names no example. Render each one first and refuse the run naming the first such line and how many there are."""
    from jinja2 import TemplateError

    refused = []
    for line, conversation in enumerate(conversations, 1):
        try:
            tokenizer.apply_chat_template(conversation, tokenize=False)
        except TemplateError as exc:
            refused.append((line, str(exc)))
    if refused:
        line, message = refused[0]
        roles = [m.get("role") for m in conversations[line - 1]]
        raise ConfigError(
            f"{path}, line {line}: the model's chat template refuses this conversation (roles {roles}): {message}; "
            f"{len(refused)} of {len(conversations)} training examples are refused. Train a model whose template "
            "accepts them, or leave them out of the data")


# ------------------------------------------------------------------------------------------------- model
def training_device(model: ModelConfig) -> str:
    from models.loading import resolve_device

    return resolve_device(model)


def load_for_training(model: ModelConfig, config: TrainStageConfig, device: str):
    """The base model to train. A PEFT adapter folder (an SFT LoRA output) is merged into its base first, so DPO
    starts from the SFT model and its adapter-disabled reference is that SFT model."""
    from models.loading import resolve_model_path

    path = Path(resolve_model_path(model))
    dtype = training_weights_dtype(model, config, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model.trust_remote_code}
    if model.gguf_file:
        kwargs["gguf_file"] = model.gguf_file
    if config.qlora:
        if is_adapter(path):
            raise ConfigError(f"{path} is a LoRA adapter; QLoRA cannot merge it into 4-bit weights: "
                              "train SFT with merge_adapter: true and start from its merged/ folder")
        kwargs["quantization_config"] = quantization_config(device, dtype)
    try:
        return load_weights(path, kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {model.name_or_path!r} for training: {exc}") from exc


def training_weights_dtype(model: ModelConfig, config: TrainStageConfig, device: str):
    """float32 weights for full fine-tuning under 'auto' (the trainer's bf16 flag autocasts the compute): weights
    held in bfloat16 round most updates at small learning rates to nothing (at 2e-5, 70 % of a layer's entries
    never moved). The same under 'float16' on CUDA, where the trainer's fp16 flag autocasts: its gradient scaler
    refuses float16 gradients ("Attempting to unscale FP16 gradients"), so float16 weights failed the first step.
    LoRA/QLoRA keep the frozen base in the compute dtype; PEFT holds the adapters in float32."""
    import torch

    from models.loading import resolve_dtype

    full = config.lora is None and not config.qlora
    if full and (model.dtype == "auto" or (model.dtype == "float16" and device == "cuda")):
        return torch.float32
    return resolve_dtype(model, device)


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").exists()


def load_weights(path: Path, kwargs: dict[str, Any]):
    """A model folder as a model; an adapter folder merged into the base it names (a LoRA SFT output, which is
    where DPO starts: training and merging after it must both see base + SFT)."""
    from transformers import AutoModelForCausalLM

    if not is_adapter(path):
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    from peft import PeftModel

    from models.loading import adapter_base

    base = adapter_base(path)  # the recorded path, or the same store path in this home after the home moved
    log.info("%s is a LoRA adapter: merging it into its base %s", path, base)
    loaded = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    merged = PeftModel.from_pretrained(loaded, str(path)).merge_and_unload()
    # PEFT froze the base while applying the adapter; merged, it is a plain model again, trainable as one loaded
    # from a folder (full-weight DPO on it failed: 'element 0 of tensors does not require grad').
    merged.requires_grad_(True)
    return merged


def quantization_config(device: str, dtype):
    """4-bit NF4 weights for QLoRA; only bitsandbytes on CUDA can do it."""
    if device != "cuda":
        raise ConfigError("qlora needs CUDA (bitsandbytes 4-bit); this machine trains on CPU: set qlora: false "
                          "(plain LoRA works on CPU)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("qlora needs the bitsandbytes package: pip install 'pomona[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def trl_config(kind: Kind, config: TrainStageConfig, out_dir: Path, device: str, dtype_name: str, report: bool):
    """SFTConfig / DPOConfig from the stage config, with device, precision, checkpoints and reporting set."""
    from trl import DPOConfig, SFTConfig

    args = config.trl_arguments()
    bf16 = device == "cuda" and dtype_name in ("auto", "bfloat16")
    args.update(
        output_dir=str(out_dir / CHECKPOINT_DIR), save_strategy="steps", logging_strategy="steps",
        use_cpu=device == "cpu", bf16=bf16, fp16=device == "cuda" and dtype_name == "float16",
        report_to=["mlflow"] if report else "none", deepspeed=config.deepspeed_file(),
        # the stage run's own name: a launched worker resumes that run by MLFLOW_RUN_ID, and the Trainer's MLflow
        # callback renames the run it resumes to this
        run_name=f"train-{kind}", disable_tqdm=False,
    )
    if kind == "sft":
        assert isinstance(config, SFTStageConfig)
        args.update(packing=config.packing)
        return SFTConfig(**args)
    return DPOConfig(**args)


def last_checkpoint(out_dir: Path) -> str | None:
    """The newest complete checkpoint: the Trainer writes `trainer_state.json` last, so a run killed while saving
    leaves a `checkpoint-N` without it (or with it cut short), and resuming from that one fails every time."""
    folder = out_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    numbered = [(int(p.name.split("-")[1]), p) for p in folder.iterdir()
                if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-")[1].isdigit()]
    for _, checkpoint in sorted(numbered, reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.warning("skipping %s: incomplete (killed while saving?)", checkpoint)
            continue
        return str(checkpoint)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reporting_to_mlflow() -> bool:
    """Report to MLflow when a run is active here, or a launcher handed us one through MLFLOW_RUN_ID."""
    if os.environ.get("MLFLOW_RUN_ID"):
        return True
    import mlflow

    return mlflow.active_run() is not None


# ------------------------------------------------------------------------------------------- in-process
def train_in_process(kind: Kind, data_path: Path, model: ModelConfig, config: TrainStageConfig, out_dir: Path,
                     callbacks: list | None = None) -> Path:
    """Train in this process (also the body of every launched worker); returns `<out_dir>/model`."""
    if config.deepspeed == "none":
        return _train_here(kind, data_path, model, config, out_dir, callbacks)
    with deepspeed_process_state():
        return _train_here(kind, data_path, model, config, out_dir, callbacks)


@contextmanager
def deepspeed_process_state() -> Iterator[None]:
    """A DeepSpeed training's process-wide marks, undone when it ends, so a later training or model load in this
    process (the next stage of a pipeline, a Prefect worker's next run) is not DeepSpeed's: transformers' DeepSpeed
    config (under ZeRO-3 every later from_pretrained loaded empty partitions), ACCELERATE_USE_DEEPSPEED and
    accelerate's process-state singletons (a later full-weight DPO had its reference wrapped in a DeepSpeed engine).
    The one-rank process group stays, with its variables: DeepSpeed's comm layer keeps it for the next DeepSpeed
    training here, and a destroyed one failed that training ('group is not registered')."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    saved = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    _set_single_process_distributed_env()
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        if saved is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = saved
        AcceleratorState._reset_state(reset_partial_state=True)


def _train_here(kind: Kind, data_path: Path, model: ModelConfig, config: TrainStageConfig, out_dir: Path,
                callbacks: list | None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = training_device(model)
    # TrainingArguments first: with ZeRO-3 it must exist before from_pretrained to partition the weights.
    args = trl_config(kind, config, out_dir, device, model.dtype, _reporting_to_mlflow())
    from models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(model)
    with zero3_partitioning_paused(args, is_adapter(Path(resolve_model_path(model)))):
        policy = load_for_training(model, config, device)
    peft_config = config.lora.peft_config() if config.lora else None
    info: dict[str, Any] = {"kind": kind}
    if kind == "sft":
        from datasets import Dataset
        from trl import SFTTrainer

        assert isinstance(config, SFTStageConfig)
        rows, loss_mask = sft_rows(Path(data_path), tokenizer, config)
        args.assistant_only_loss = loss_mask == "assistant"
        args.completion_only_loss = True if loss_mask == "completion" else None
        info["loss_mask"] = loss_mask
        special = screen_special_tokens(rows, tokenizer, "sft", data_path)
        trainer = SFTTrainer(model=policy, args=args, train_dataset=Dataset.from_list(numbered_rows(rows, special)),
                             processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
        rows = account_for_dropped(trainer, rows, special, "sft", config, data_path, out_dir,
                                   f"loss mask '{loss_mask}': the first trained token lies beyond it", info)
    else:
        from datasets import Dataset
        from trl import DPOTrainer

        rows = read_jsonl(data_path)
        if not rows:
            raise ConfigError(f"{data_path}: no preference pairs")
        if all(isinstance(r.get("prompt"), list) and isinstance(r.get("chosen"), list) for r in rows):
            refuse_untemplatable([r["prompt"] + r["chosen"] for r in rows], tokenizer, data_path)
        # ref_model None: with a peft_config the reference is the adapter-disabled policy; without one TRL loads it
        # from the folder the policy's config names, which after merging a LoRA SFT is the bare base (no SFT).
        special = screen_special_tokens(rows, tokenizer, "dpo", data_path)
        trainer = DPOTrainer(model=policy, ref_model=dpo_reference(model, config, device, args), args=args,
                             train_dataset=Dataset.from_list(numbered_rows(rows, special)),
                             processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
        rows = account_for_dropped(trainer, rows, special, "dpo", config, data_path, out_dir,
                                   "the prompt alone fills it, leaving neither response", info)
    info["examples"] = len(rows)
    resume = last_checkpoint(out_dir)
    if resume:
        log.info("resuming %s training from %s", kind, resume)
    result = trainer.train(resume_from_checkpoint=resume)
    model_dir = out_dir / MODEL_DIR
    trainer.save_model(str(model_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(model_dir))
        canonical_adapter_config(model_dir)
        info.update(global_step=trainer.state.global_step, resumed_from=resume, train_loss=result.training_loss,
                    adapter=config.lora is not None, qlora=config.qlora, base_model=str(model.name_or_path),
                    device=device, deepspeed=config.deepspeed, log_history=trainer.state.log_history)
        # An adapter trained on top of a LoRA SFT applies to base + SFT, which exists nowhere on disk: its own
        # adapter_config names the bare base, so loading model/ would silently drop the SFT. merged/ (what is
        # evaluated and registered) is then always written.
        stacked = config.lora is not None and is_adapter(Path(resolve_model_path(model)))
        if config.merge_adapter or stacked:
            with zero3_partitioning_paused(args):
                merge_adapter(model_dir, out_dir / MERGED_DIR, model, device)
            info["merged"] = MERGED_DIR
            info["adapter_applies_to"] = "base + the start model's adapter (use merged/)" if stacked else "base"
        atomic_write_text(out_dir / RESULT_FILE, json.dumps(info, indent=1, default=str))
    return model_dir


@contextmanager
def zero3_partitioning_paused(args, pause: bool = True) -> Iterator[None]:
    """Load whole weights while a ZeRO-3 trainer config is alive (`pause` False: leave it on). That config makes
    every `from_pretrained` partition the weights over the ranks (zero.Init), so outside the engine each parameter
    is an empty tensor: merging a LoRA adapter into such a base failed ('The size of tensor a (0) must match'), for
    `merge_adapter` after training and for DPO starting from an SFT adapter, and with several ranks only rank 0
    merges, which the others would have to join. The engine partitions a whole model itself when training starts."""
    held = getattr(args, "hf_deepspeed_config", None)
    if not pause or held is None or not held.is_zero3():
        yield
        return
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(held)


def dpo_reference(model: ModelConfig, config: TrainStageConfig, device: str, args):
    """The reference model of a full-weight DPO that starts from a LoRA adapter folder: base + adapter merged as
    the policy is (None otherwise, TRL's own reference is right). TRL loads its reference from the policy's config
    `_name_or_path`, and a merged adapter's config names the bare base, so that DPO kept the policy near the model
    SFT started from, not near the SFT model."""
    from models.loading import resolve_model_path

    if config.lora is not None or not is_adapter(Path(resolve_model_path(model))):
        return None
    with zero3_partitioning_paused(args):
        reference = load_for_training(model, config, device)
    return reference.requires_grad_(False).eval()


def canonical_adapter_config(model_dir: Path) -> None:
    """Sort the module lists of a saved adapter's `adapter_config.json`. PEFT keeps `target_modules` as a set and
    writes it in an order that follows the process's string hash seed, so the same weights trained twice gave two
    model/ digests: retraining a stage (its folder deleted, or another worker) gave every downstream stage a new
    key and recomputed it."""
    path = Path(model_dir) / "adapter_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    changed = False
    for key in ("target_modules", "exclude_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key], changed = sorted(config[key]), True
    if changed:
        atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True))


def merge_adapter(adapter_dir: Path, merged_dir: Path, base: ModelConfig, device: str) -> Path:
    """Base weights (full precision, also after QLoRA) with the adapter folded in, saved as a normal model."""
    from peft import PeftModel

    from models.loading import load_tokenizer, resolve_dtype, resolve_model_path

    # the same weights training started from (an SFT adapter merged into its base), not the folder as a model
    loaded = load_weights(Path(resolve_model_path(base)), {"dtype": resolve_dtype(base, device),
                                                          "trust_remote_code": base.trust_remote_code})
    merged = PeftModel.from_pretrained(loaded, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(merged_dir))
    load_tokenizer(base).save_pretrained(str(merged_dir))
    return merged_dir


def _set_single_process_distributed_env() -> None:
    """DeepSpeed wants a process group even for one process: gloo on CPU, from these variables (kept if a
    launcher set them)."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))


# -------------------------------------------------------------------------------------------- launchers
def launch_command(kind: Kind, data_path: Path, model: ModelConfig, config: TrainStageConfig,
                   out_dir: Path) -> list[str]:
    """`torchrun` / `accelerate launch` running `tasks.train_entry` in `num_processes` workers."""
    spec = out_dir / f"{kind}-launch.json"
    atomic_write_text(spec, json.dumps({"kind": kind, "data_path": str(data_path), "out_dir": str(out_dir),
                                        "model": model.model_dump(mode="json"),
                                        "config": config.model_dump(mode="json")}, indent=1))
    bindir = Path(sys.executable).parent
    entry = ["-m", "tasks.train_entry", str(spec)]
    if config.launcher == "torchrun":
        return [str(bindir / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(config.num_processes),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *entry]
    cpu = training_device(model) == "cpu"
    return [str(bindir / "accelerate"), "launch", "--config_file", str(ACCELERATE_FILES[config.deepspeed]),
            "--num_processes", str(config.num_processes), "--main_process_port", str(free_port()),
            *(["--cpu"] if cpu and config.deepspeed == "none" else []), *entry]


def refuse_more_processes_than_gpus(model: ModelConfig, config: TrainStageConfig) -> None:
    """On CUDA each launched worker takes the GPU of its local rank: with more workers than visible GPUs the extra
    ones died at start-up ('invalid device ordinal') inside the launcher's log, after the others had loaded."""
    if training_device(model) != "cuda":
        return
    import torch

    visible = torch.cuda.device_count()
    if config.num_processes > visible:
        raise ConfigError(f"num_processes {config.num_processes} but {visible} GPU(s) visible here "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): one worker per "
                          "GPU, so set num_processes to at most that")


def train_subprocess(kind: Kind, data_path: Path, model: ModelConfig, config: TrainStageConfig, out_dir: Path) -> Path:
    """Run the launcher as a child process; its output goes to `<out_dir>/launcher.log` and to our stdout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    refuse_more_processes_than_gpus(model, config)
    command = launch_command(kind, data_path, model, config, out_dir)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for name in DISTRIBUTED_ENV_VARS:  # the launcher sets its own
        env.pop(name, None)
    import mlflow

    active = mlflow.active_run()
    if active is not None:
        env["MLFLOW_RUN_ID"] = active.info.run_id
        env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    launch_id = env[LAUNCH_ID_ENV] = f"{os.getpid()}-{time.time_ns()}"
    log.info("launching: %s", " ".join(command))
    log_path = out_dir / "launcher.log"
    with open(log_path, "a", encoding="utf-8") as sink:
        # its own process group, so the launcher and the ranks it starts can be stopped together (below)
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = relay_output(proc, sink)
        except BaseException:
            # Ctrl-C, a SIGTERM to pomona, a cancelled flow: the training must stop with the stage, not go on
            # holding the GPUs with no one reading its output
            stop_process_group(proc, launch_id=launch_id)
            raise
    if code != 0:
        tail = "".join(log_path.read_text(encoding="utf-8").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{config.launcher} {kind} training failed with exit code {code}; log {log_path}:\n{tail}")
    model_dir = out_dir / MODEL_DIR
    if not (out_dir / RESULT_FILE).exists():
        raise RuntimeError(f"{config.launcher} exited 0 but wrote no {RESULT_FILE} in {out_dir}")
    return model_dir


def relay_output(proc: subprocess.Popen, sink, step_s: float = INTERRUPTIBLE_STEP_S) -> int:
    """Copy the launcher's output (a binary pipe) to `sink` and our stdout until it ends; returns its exit status.

    Waits in steps of `step_s`, never in one long C call: in a comparison branch (a worker thread), the interrupt of
    a cancelled flow run arrives as an exception raised in this thread (`tasks.runner.WorkerThreads`), which Python
    delivers only between instructions. A read that blocked while the training printed nothing (starting, loading,
    saving a checkpoint, a long step) held it off; a served run's process was then SIGKILLed by the runner after its
    30 s grace, and the launcher and its ranks trained on, their MLflow runs RUNNING."""
    import codecs
    import io
    import select

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    # what text=True did: the locale's decoding (UTF-8 here, a bad byte no longer fatal), \r and \r\n read as \n
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(errors="replace"), translate=True)
    while True:
        if not select.select([fd], [], [], step_s)[0]:
            continue
        chunk = os.read(fd, 1 << 16)
        text = decoder.decode(chunk, final=not chunk)
        if text:
            sink.write(text)
            sys.stdout.write(text)
        if not chunk:
            break
    proc.stdout.close()
    return wait_in_short_steps(lambda step: proc.wait(timeout=step), subprocess.TimeoutExpired, step_s)


LAUNCH_ID_ENV = "POMONA_LAUNCH_ID"
"""Set in a launched training's environment (inherited by its ranks), so that `stop_process_group` finds ranks the
process tree no longer leads to: those of a launcher that died and left them reparented, in sessions of their own."""


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20.0, launch_id: str | None = None) -> None:
    """SIGTERM to `proc`'s process group and to its other processes, SIGKILL to the group and every one of them still
    there after `grace_s` - shorter than the 30 s a Prefect runner grants a cancelled flow run before it kills this
    process, so the SIGKILL is still ours to send. Its processes: the launcher's descendants, and every process whose
    environment carries `LAUNCH_ID_ENV=launch_id`.

    The group alone is not enough: torchrun starts each rank in a session of its own, so a rank that ignored or
    outlived the SIGTERM survived the group's SIGKILL as an orphan holding its GPU memory."""
    import signal

    import psutil

    gone = (psutil.NoSuchProcess, psutil.AccessDenied)  # ZombieProcess is a NoSuchProcess
    # pid -> process; psutil's Process refuses to signal a pid that a new process has taken over. Kept between
    # looks: a dead launcher's ranks are reparented and no longer its descendants.
    tracked: dict[int, psutil.Process] = {}

    def track(pid: int) -> None:
        if pid not in tracked:
            with suppress(*gone):
                tracked[pid] = psutil.Process(pid)

    def tagged() -> None:  # a full read of every process's environment: at the start and before the SIGKILL only
        if launch_id is None:
            return
        from tasks.track import processes_with_env

        for pid, value in processes_with_env(LAUNCH_ID_ENV).items():
            if value == launch_id:
                track(pid)

    def running() -> list[psutil.Process]:
        # one read of the process table per look, then the tracked processes' descendants from it: ranks spawned
        # late, and the children of orphaned ranks, count too
        children: dict[int, list[int]] = {}
        for process in psutil.process_iter(["ppid"]):
            children.setdefault(process.info["ppid"], []).append(process.pid)
        todo = list(tracked)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in tracked:
                    track(child)
                    todo.append(child)
        alive = []
        for process in tracked.values():
            with suppress(*gone):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
        return alive

    def group_alive() -> bool:
        proc.poll()  # reap the launcher itself: a zombie still counts as a member of its group
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def signal_each(processes: Iterable[psutil.Process], signum: int) -> None:
        for process in processes:
            with suppress(*gone):
                process.send_signal(signum)

    def outside_group(process: psutil.Process) -> bool:
        try:
            return os.getpgid(process.pid) != proc.pid
        except ProcessLookupError:
            return False

    deadline = time.monotonic() + grace_s
    if proc.poll() is None:  # once reaped, its pid may already be another process's
        track(proc.pid)
    tagged()
    survivors = running()
    if group_alive():
        os.killpg(proc.pid, signal.SIGTERM)
    # the group's members get the group's SIGTERM once; a second one could cut short the launcher's own shutdown
    signal_each([process for process in survivors if outside_group(process)], signal.SIGTERM)
    while (group_alive() or survivors) and time.monotonic() < deadline:
        time.sleep(0.1)
        survivors = running()
    tagged()
    survivors = running()
    if group_alive():
        os.killpg(proc.pid, signal.SIGKILL)
    signal_each(survivors, signal.SIGKILL)
    proc.wait()


def _train(kind: Kind, data_path: Path, model: ModelConfig, config: TrainStageConfig, out_dir: Path,
           callbacks: list | None) -> Path:
    if config.launcher == "inprocess":
        return train_in_process(kind, Path(data_path), model, config, Path(out_dir), callbacks)
    if callbacks:
        raise ValueError("callbacks cannot cross into a launched subprocess; use launcher 'inprocess'")
    return train_subprocess(kind, Path(data_path).resolve(), model, config, Path(out_dir).resolve())


def sft_train(messages_path: Path, model: ModelConfig, config: SFTStageConfig, out_dir: Path,
              callbacks: list | None = None) -> Path:
    """SFT on a `messages` JSONL file; returns the saved model (or adapter) folder `<out_dir>/model`."""
    return _train("sft", messages_path, model, config, out_dir, callbacks)


def dpo_train(pairs_path: Path, model: ModelConfig, config: DPOStageConfig, out_dir: Path,
              callbacks: list | None = None) -> Path:
    """DPO on conversational preference rows (prompt / chosen / rejected JSONL, see tasks.preferences); returns
    `<out_dir>/model`. `model` may be an SFT output folder, a LoRA adapter folder included."""
    return _train("dpo", pairs_path, model, config, out_dir, callbacks)


def read_train_result(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / RESULT_FILE).read_text())


# ------------------------------------------------------------------------------------------------ stages
class TrainingInterrupted(RuntimeError):
    """Raised by `interrupt_after_step`: stops training as a crash would, leaving its checkpoints behind."""


def _interrupt_callback(step: int):
    from transformers import TrainerCallback

    class InterruptAfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                raise TrainingInterrupted(f"training interrupted on purpose after step {state.global_step}; "
                                          "rerun the stage to resume from its last checkpoint")

    return InterruptAfterStep()


# The tags a training run carries about what it trained on (selection_tags, and the SFT stage a DPO run started from)
PROVENANCE_TAGS = ("selection_method", "selection_stage", "dataset_digest", "sft_stage_key")


def selection_tags(selection: StageOutput, data_file: Path) -> dict[str, str]:
    """What a trained model traces back to: the selection method and the digest of the exact training file."""
    method = selection.stage.removeprefix("select-")
    for dataset in selection.datasets:
        if dataset.get("context") == "training" and dataset["name"].endswith("-subset"):
            method = dataset["name"].removesuffix("-subset")
    return {"selection_method": method, "selection_stage": selection.stage,
            "dataset_digest": file_digest(data_file)[:16]}


@contextmanager
def training_run(parent_run_id: str | None, stage: str, tags: dict[str, str]) -> Iterator[str | None]:
    """The stage's MLflow child run, opened before training and active in this thread while it trains.

    The flow logs the stage's config, metrics and dataset into the same run afterwards (tasks.track.log_stage with
    run_id). A failed attempt's run is marked FAILED (KILLED when interrupted); the rerun opens a new one and resumes
    the checkpoints.
    """
    if not parent_run_id:
        yield None
        return
    import mlflow

    from tasks.track import client, end_run_by, process_tags, tracking_uri

    mlc = client()
    parent = mlc.get_run(parent_run_id)
    run = mlc.create_run(parent.info.experiment_id, run_name=stage,
                         tags={"mlflow.parentRunId": parent_run_id, "pomona.stage": stage, **process_tags(), **tags})
    mlflow.set_tracking_uri(tracking_uri())
    try:
        with mlflow.start_run(run_id=run.info.run_id):
            yield run.info.run_id
            mlflow.flush_async_logging()
    except BaseException as exc:
        mlflow.flush_async_logging()
        end_run_by(run.info.run_id, exc)
        raise


def log_trained_model(run_id: str, folder: Path, stage: str, config: TrainStageConfig, tags: dict[str, str]) -> dict:
    """Log `model/` (and `merged/`) as run artifacts and register a model version carrying the tags."""
    from mlflow.exceptions import MlflowException

    from tasks.track import client

    mlc = client()
    mlc.log_artifacts(run_id, str(folder / MODEL_DIR), artifact_path=MODEL_DIR)
    if (folder / MERGED_DIR).is_dir():
        mlc.log_artifacts(run_id, str(folder / MERGED_DIR), artifact_path=MERGED_DIR)
    if not config.register_model:
        return {}
    run = mlc.get_run(run_id)
    name = config.registered_model_name or f"{mlc.get_experiment(run.info.experiment_id).name}-{stage}"
    try:
        mlc.create_registered_model(name, description=f"pomona {stage} models")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source_dir = MERGED_DIR if (folder / MERGED_DIR).is_dir() else MODEL_DIR
    version = mlc.create_model_version(name, source=f"{run.info.artifact_uri}/{source_dir}", run_id=run_id,
                                       tags={**tags, "adapter": str(config.lora is not None and source_dir == MODEL_DIR).lower()})
    return {"train.registered_model": name, "train.registered_version": str(version.version)}


def whole_run_mean_loss(session_mean: float, global_step: int, resumed_step: int, log_history: list[dict]) -> float:
    """The mean training loss over every step of a run. After a resume, the trainer's own `training_loss` averages
    only the steps of that attempt; the steps before the checkpoint come from the losses logged then (each log
    entry is the mean over its logging interval, weighted here by the interval's length)."""
    if not resumed_step:
        return session_mean
    logged = sorted((h for h in log_history if "loss" in h and "step" in h and h["step"] <= resumed_step),
                    key=lambda h: h["step"])
    total, covered, previous = 0.0, 0, 0
    for entry in logged:
        total += entry["loss"] * (entry["step"] - previous)
        covered += entry["step"] - previous
        previous = entry["step"]
    after = global_step - resumed_step
    return (total + session_mean * after) / (covered + after) if covered + after else session_mean


def _stage_fields(folder: Path, stage: str, info: dict, run_id: str | None, registered: dict,
                  dataset: dict[str, str]) -> dict[str, Any]:
    """StageOutput fields of a training stage, with the loss curve drawn from the trainer's log history."""
    from tasks.plots import line_chart

    history = [h for h in info.get("log_history", []) if "loss" in h and "step" in h]
    artifacts = [RESULT_FILE]
    if history:
        # named by what it trained on: a comparison's curves look alike once downloaded side by side
        line_chart([h["step"] for h in history], [h["loss"] for h in history], folder / "loss_curve.png",
                   title=f"{stage} loss on {dataset['name']} ({info['examples']} examples)", xlabel="step",
                   ylabel="loss")
        artifacts.append("loss_curve.png")
    resumed = info.get("resumed_from")
    resumed_step = int(resumed.rsplit("-", 1)[1]) if resumed else 0
    mean_loss = whole_run_mean_loss(info["train_loss"], info["global_step"], resumed_step, info.get("log_history", []))
    metrics = {"train.global_step": info["global_step"], "train.examples": info["examples"],
               "train.mean_loss": mean_loss, "train.resumed_from_step": resumed_step}
    if "examples_dropped" in info:  # examples TRL dropped after truncation (and, SFT, the kept ones it cut)
        metrics.update({"train.examples_given": info["examples_given"],
                        "train.examples_dropped_truncated": info["examples_dropped"],
                        "train.examples_special_tokens": info.get("examples_special_tokens", 0)})
        if info.get("examples_at_max_length") is not None:
            metrics["train.examples_at_max_length"] = info["examples_at_max_length"]
        if (folder / TRAIN_REJECTS).exists():
            artifacts.append(TRAIN_REJECTS)
    if history:
        metrics["train.final_loss"] = history[-1]["loss"]
    params = {"train.loss_mask": info.get("loss_mask", "dpo"), "train.model_dir": str(folder / MODEL_DIR), **registered}
    if run_id:
        params["train.mlflow_run_id"] = run_id
    summary = (f"{stage}: **{info['global_step']}** steps on {info['examples']} examples, mean loss "
               f"{mean_loss:.4f}" + (f", resumed from `{Path(resumed).name}`" if resumed else "")
               + (f"; registered as {registered['train.registered_model']} v{registered['train.registered_version']}"
                  if registered else "") + ".")
    if info.get("examples_dropped"):
        summary += (f" {info['examples_dropped']} of {info['examples_given']} examples had no trained token left "
                    f"after truncation to max_length and were not trained on (see {TRAIN_REJECTS}).")
    if info.get("examples_special_tokens"):
        summary += (f" {info['examples_special_tokens']} of {info['examples_given']} examples hold a special "
                    f"token's text and were not trained on (see {TRAIN_REJECTS}).")
    if info.get("loss_mask") == "completion":
        summary += " The chat template has no generation markers: loss on the final assistant reply only."
    return {"metrics": metrics, "params": params, "artifacts": artifacts, "datasets": [dataset], "summary": summary}


def sft_stage(selection: StageOutput, model: ModelConfig, config: SFTStageConfig, tracking: str | None = None,
              interrupt_after_step: int | None = None) -> StageOutput:
    """Stage `train-sft`: SFT on a selection's `subset.messages.jsonl`.

    `tracking` is the parent MLflow run id (not part of the cache key). `interrupt_after_step` stops the first
    attempt as a crash would (for resume demos and tests); the rerun resumes from the last checkpoint.
    """
    source = selection.file("subset.messages.jsonl")
    tags = selection_tags(selection, source)

    def body(folder: Path) -> dict:
        data = folder / "train.messages.jsonl"
        shutil.copyfile(source, data)
        callbacks = [_interrupt_callback(interrupt_after_step)] if interrupt_after_step else None
        with training_run(tracking, "train-sft", tags) as run_id:
            sft_train(data, model, config, folder, callbacks=callbacks)
            registered = log_trained_model(run_id, folder, "sft", config, tags) if run_id else {}
        info = read_train_result(folder)
        dataset = {"name": f"{tags['selection_method']}-subset", "file": data.name, "context": "training",
                   "digest": tags["dataset_digest"]}
        return _stage_fields(folder, "train-sft", info, run_id, registered, dataset)

    return run_stage("train-sft", {"model": model, "train": config}, [selection], body, digest_of=[MODEL_DIR],
                     digest_file=portable_model_digest)


def dpo_stage(pairs: StageOutput | None, model: ModelConfig, config: DPOStageConfig, sft: StageOutput | None = None,
              tracking: str | None = None, interrupt_after_step: int | None = None) -> StageOutput:
    """Stage `train-dpo`: DPO on preference pairs, starting from the SFT stage's model when given.

    Pairs come from `config.pairs_path` (ShareGPT DPO or GRAPE pairs file) or else from the selection stage's
    `pairs.jsonl` (GRAPE with dpo pairs enabled).
    """
    from tasks.preferences import read_preference_pairs

    if config.pairs_path:
        source = Path(config.pairs_path)
        inputs: list[Any] = [{"pairs_file": file_digest(source)}]
        tags = {"selection_method": "given-pairs", "dataset_digest": file_digest(source)[:16]}
    elif pairs is not None and pairs.file("pairs.jsonl").exists():
        source = pairs.file("pairs.jsonl")
        inputs = [pairs]
        tags = selection_tags(pairs, source)
    else:
        raise ConfigError("DPO needs preference pairs: set dpo.pairs_path, or a selection that writes pairs.jsonl "
                          "(GRAPE with dpo.enabled: true)")
    start = model
    if sft is not None:
        merged = sft.file(MERGED_DIR)
        start = model.model_copy(update={"name_or_path": str(merged if merged.is_dir() else sft.file(MODEL_DIR)),
                                         "gguf_file": None})
        inputs.append(sft)
        tags["sft_stage_key"] = sft.key

    def body(folder: Path) -> dict:
        read = read_preference_pairs(source, on_error=config.on_error)
        write_jsonl(folder / "pairs.jsonl", read.rows)
        write_jsonl(folder / "rejects.jsonl", read.rejects)
        if not read.rows:  # here, naming the user's file and why, not later as "no preference pairs" in the store
            raise RecordError(str(source), "whole file", None, no_pairs_reason(read.rejects, folder / "rejects.jsonl",
                                                                              bool(config.pairs_path)))
        callbacks = [_interrupt_callback(interrupt_after_step)] if interrupt_after_step else None
        with training_run(tracking, "train-dpo", tags) as run_id:
            dpo_train(folder / "pairs.jsonl", start, config, folder, callbacks=callbacks)
            registered = log_trained_model(run_id, folder, "dpo", config, tags) if run_id else {}
        info = read_train_result(folder)
        dataset = {"name": f"{tags['selection_method']}-pairs", "file": "pairs.jsonl", "context": "training",
                   "digest": tags["dataset_digest"]}
        fields = _stage_fields(folder, "train-dpo", info, run_id, registered, dataset)
        fields["metrics"].update({f"dpo.{k}": v for k, v in read.counts.items()})
        fields["artifacts"].append("rejects.jsonl")
        return fields

    return run_stage("train-dpo", {"model": model, "train": config}, inputs, body, digest_of=[MODEL_DIR],
                     digest_file=portable_model_digest)


def no_pairs_reason(rejects: list[dict], rejects_file: Path, given: bool) -> str:
    """Why a preference file (`given`: dpo.pairs_path, else the selection's) gave no pair to train on: empty, or
    every row rejected (counts per kind)."""
    if not rejects:
        return ("no preference pairs in it: " + ("give a file with at least one pair (dpo.pairs_path)" if given else
                "the selection wrote none (its dpo_skipped[...] counts say why): lower selection.dpo.min_margin, or "
                "set dpo.pairs_path"))
    kinds = ", ".join(f"{k.removeprefix('rejected[').removesuffix(']')} {n}"
                      for k, n in reject_counts(r["reason"] for r in rejects).items())
    return (f"all {len(rejects)} preference rows read were rejected ({kinds}), so none is left to train on: fix "
            f"them (each is listed with its line and reason in {rejects_file})")


def trained_model(out: StageOutput, base: ModelConfig) -> ModelConfig:
    """The model a training stage produced (its merged folder when there is one), loadable like any model."""
    folder = out.file(MERGED_DIR) if out.file(MERGED_DIR).is_dir() else out.file(MODEL_DIR)
    return base.model_copy(update={"name_or_path": str(folder), "gguf_file": None})


sft_stage_task = stage_task(sft_stage, name="train-sft")
dpo_stage_task = stage_task(dpo_stage, name="train-dpo")
