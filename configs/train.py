"""Training stage configs: TRL SFT and DPO, with PEFT (LoRA / QLoRA), DeepSpeed and a launcher.

Field names follow TRL's `SFTConfig` / `DPOConfig` (and transformers' `TrainingArguments`) one to one, so a recipe
reads like the TRL docs and `trl_arguments()` is a plain copy. Combinations that cannot work are refused here, at
load time; the one check that needs the machine (QLoRA needs CUDA) happens when the stage starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from configs.schema import INPUT_FILE, DataConfig, ModelConfig, StrictModel, TrackingConfig, tracking_field

CONFIG_DIR = Path(__file__).resolve().parent
DEEPSPEED_FILES = {"zero2": CONFIG_DIR / "deepspeed" / "zero2.json", "zero3": CONFIG_DIR / "deepspeed" / "zero3.json"}
ACCELERATE_FILES = {"none": CONFIG_DIR / "accelerate" / "multi_process.yaml",
                    "zero2": CONFIG_DIR / "accelerate" / "deepspeed_zero2.yaml",
                    "zero3": CONFIG_DIR / "accelerate" / "deepspeed_zero3.yaml"}


class LoraSettings(StrictModel):
    """A LoRA adapter (PEFT `LoraConfig`)."""

    r: int = Field(16, ge=1, description="Rank of the low-rank update matrices.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (`lora_alpha`); the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input (`lora_dropout`).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]) or 'all-linear' for every linear layer but the head.")

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM")


class TrainStageConfig(StrictModel):
    """What SFT and DPO share: the optimisation schedule, checkpoints, PEFT, DeepSpeed and the launcher."""

    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate (TRL `learning_rate`).")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the training set; ignored when max_steps is set.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    max_length: int = Field(1024, ge=16, description="Truncate tokenized examples to this many tokens (TRL `max_length`).")
    per_device_train_batch_size: int = Field(4, ge=1, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule.")
    warmup_steps: float = Field(
        0, ge=0, description="Linear warmup: whole steps (>= 1) or a share of all steps (a float below 1).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory, slower).")
    seed: int = Field(42, description="Seed for model init of new weights, data order and dropout.")
    logging_steps: int = Field(10, ge=1, description="Log loss and learning rate to MLflow every N steps.")
    save_steps: int = Field(200, ge=1, description="Write a checkpoint every N steps (a rerun resumes from the last one).")
    save_total_limit: int | None = Field(2, ge=1, description="Keep only the newest N checkpoints.")
    lora: LoraSettings | None = Field(None, description="Train a LoRA adapter instead of all weights.")
    qlora: bool = Field(False, description="Load the base model in 4-bit (bitsandbytes, CUDA only) under the LoRA adapter.")
    deepspeed: Literal["none", "zero2", "zero3"] = Field(
        "none", description="DeepSpeed ZeRO stage (configs/deepspeed/*.json, 'auto' values filled from these fields).")
    launcher: Literal["inprocess", "torchrun", "accelerate"] = Field(
        "inprocess", description="'inprocess' trains inside the Prefect task; 'torchrun'/'accelerate' launch "
                                 "num_processes workers as a subprocess.")
    num_processes: int = Field(1, ge=1, description="Worker processes (GPUs) for torchrun / accelerate launch.")
    merge_adapter: bool = Field(False, description="Also save the base model with the LoRA adapter merged in (`merged/`).")
    register_model: bool = Field(True, description="Register the trained model in the MLflow model registry.")
    registered_model_name: str | None = Field(
        None, description="Registry name; defaults to `<experiment>-<stage>`.")

    @model_validator(mode="after")
    def _combinations(self):
        if self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps):
            raise ValueError(f"warmup_steps {self.warmup_steps}: whole steps (>= 1) or a share below 1")
        if self.qlora and self.lora is None:
            raise ValueError("qlora needs a 'lora' adapter: 4-bit weights cannot be trained directly")
        if self.merge_adapter and self.lora is None:
            raise ValueError("merge_adapter needs 'lora': a full fine-tune has no adapter to merge")
        if self.launcher == "inprocess" and self.num_processes > 1:
            raise ValueError("num_processes > 1 needs launcher 'torchrun' or 'accelerate'")
        if self.qlora and self.deepspeed == "zero3":
            raise ValueError("qlora with DeepSpeed ZeRO-3 is not supported by bitsandbytes 4-bit loading here; use zero2")
        return self

    def deepspeed_file(self) -> str | None:
        return None if self.deepspeed == "none" else str(DEEPSPEED_FILES[self.deepspeed])

    def trl_arguments(self) -> dict[str, Any]:
        """The fields that map 1:1 onto TRL's config (device, output and reporting are set by the stage)."""
        names = ["learning_rate", "num_train_epochs", "max_length", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "seed", "logging_steps", "save_steps", "save_total_limit"]
        out = {name: getattr(self, name) for name in names}
        out["max_steps"] = self.max_steps if self.max_steps is not None else -1
        # transformers 5 renamed gradient_checkpointing (the name TRL's docs still use) and warns on the old one.
        out["activation_checkpointing"] = self.gradient_checkpointing
        return out


class SFTStageConfig(TrainStageConfig):
    """Supervised fine-tuning with TRL's SFTTrainer on conversational `messages`."""

    packing: bool = Field(False, description="Pack several short examples into one max_length sequence.")
    assistant_only_loss: bool = Field(
        True, description="Loss on assistant tokens only (needs {% generation %} markers in the chat template).")
    without_generation_markers: Literal["raise", "prompt_completion"] = Field(
        "prompt_completion",
        description="When assistant_only_loss is on but the chat template has no {% generation %} markers: 'raise', "
                    "or train on prompt/completion rows (loss on the final assistant reply only; logged as such).")


class DPOStageConfig(TrainStageConfig):
    """Direct preference optimisation with TRL's DPOTrainer; with LoRA the reference is the adapter-disabled base."""

    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate (DPO wants a smaller one than SFT).")
    beta: float = Field(0.1, gt=0, description="DPO temperature: how far the policy may move from the reference.")
    loss_type: Literal["sigmoid", "hinge", "ipo"] = Field("sigmoid", description="DPO loss variant (TRL `loss_type`).")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="Bad preference rows: 'raise' at the first, or 'skip' them into rejects.jsonl (counted).")
    pairs_path: str | None = Field(
        None, json_schema_extra=INPUT_FILE, description="Preference pairs file (ShareGPT DPO JSON or GRAPE pairs JSONL); None = pairs from the selection stage.")

    def trl_arguments(self) -> dict[str, Any]:
        out = super().trl_arguments()
        out.update(beta=self.beta, loss_type=[self.loss_type])
        return out


class TrainingConfig(StrictModel):
    """The training part of a pipeline: a base model, SFT on the selected subset, then optional DPO."""

    model: ModelConfig = Field(description="The base model to fine-tune.")
    sft: SFTStageConfig | None = Field(default_factory=SFTStageConfig, description="SFT on the selected subset; None skips it.")
    dpo: DPOStageConfig | None = Field(None, description="DPO after SFT (or on the base model when sft is None).")

    @model_validator(mode="after")
    def _something(self):
        if self.sft is None and self.dpo is None:
            raise ValueError("training needs 'sft', 'dpo' or both")
        return self


class SFTFlowConfig(StrictModel):
    """The stand-alone SFT flow: train a model on a whole data file (every record, as `messages`)."""

    name: str = Field(min_length=1, description="Run name; also the MLflow experiment unless tracking.experiment is set.")
    data: DataConfig = Field(description="Training records (Alpaca, ShareGPT or messages).")
    model: ModelConfig = Field(description="The base model to fine-tune.")
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig, description="SFT hyper-parameters.")
    dpo: DPOStageConfig | None = Field(None, description="Optional DPO after SFT (needs dpo.pairs_path).")
    tracking: TrackingConfig = tracking_field()

    @model_validator(mode="after")
    def _pairs_given(self):
        if self.dpo is not None and not self.dpo.pairs_path:
            raise ValueError("dpo.pairs_path is required here: this flow has no selection that writes pairs")
        return self

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name


class DPOFlowConfig(StrictModel):
    """The stand-alone DPO flow: preference-tune a model (e.g. an SFT stage's model/ or merged/ folder)."""

    name: str = Field(min_length=1, description="Run name; also the MLflow experiment unless tracking.experiment is set.")
    model: ModelConfig = Field(description="The model to start from (a LoRA adapter folder is merged into its base first).")
    dpo: DPOStageConfig = Field(description="DPO hyper-parameters; dpo.pairs_path names the preference file.")
    tracking: TrackingConfig = tracking_field()

    @model_validator(mode="after")
    def _pairs_given(self):
        if not self.dpo.pairs_path:
            raise ValueError("dpo.pairs_path is required: the preference pairs file to train on")
        return self

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name
