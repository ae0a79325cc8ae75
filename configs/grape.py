"""GRAPE configs: candidate responses from several generators (or a file), fit under a target model, selection.

GRAPE (Zhang, Dai, Peng 2025) has no official code; every choice the paper leaves open is a field here, logged
with the run: the fit criterion, whether the end-of-turn marker is scored, the tie-break, the DPO pair rule.
"""

from __future__ import annotations

import posixpath
import re
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from configs.runner import ScaleOutConfig, scale_out_field
from configs.schema import (INPUT_FILE, RUNTIME_ONLY, DataConfig, ModelConfig, StrictModel, TrackingConfig, share_count,
                            tracking_field)

Criterion = Literal["mean_logprob", "sum_logprob", "per_byte"]
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_PARAM_KEY = re.compile(r"^[\w./ -]+$")  # MLflow's param-name characters (without ':', refused on Windows)


class SamplingConfig(StrictModel):
    """Decoding parameters; every generated row records them (and the seed it was given)."""

    max_new_tokens: int = Field(256, ge=1, description="Most tokens generated per response.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature; 0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 = off).")
    top_k: int | None = Field(None, ge=1, description="Keep only the k most likely tokens (None = off).")
    repetition_penalty: float = Field(1.0, gt=0, description="transformers/vLLM repetition penalty (1 = off); "
                                                               "sent as an extra field to HTTP endpoints when not 1.")
    seed: int = Field(0, description="Base seed. Each shard derives its own seed from it (recorded per row): "
                                     "transformers seeds once per shard, vLLM and HTTP send one seed per request.")


class EndpointConfig(StrictModel):
    """An OpenAI-compatible chat-completions endpoint (a local vLLM or llama.cpp server, or a hosted API)."""

    base_url: str = Field(description="Base URL up to the API version, e.g. http://127.0.0.1:8000/v1; "
                                      "requests go to `<base_url>/chat/completions`.")
    model: str = Field(description="Model name the server expects in the request body.")
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the API key "
                                                       "(the key itself never goes into a recipe or MLflow).")
    timeout_s: float = Field(120.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(5, ge=0, description="Retries after a timeout, connection error, 408/409/429 or 5xx.")
    backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubles each retry (Retry-After wins).")
    max_backoff_s: float = Field(60.0, ge=0, description="Upper bound of one retry delay.")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    tokenizer: ModelConfig | None = Field(
        None, description="The served model's tokenizer (a local folder or hub name; only the tokenizer is loaded): "
                          "a conversation whose messages hold one of its special tokens as text is then not sent "
                          "(finish_reason special_token), as the local backends do. None: such text is sent as it "
                          "is, and the server's tokenizer reads it as that control token.")

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return value.rstrip("/")


class VllmSettings(StrictModel):
    """How a 'vllm' generator's engine uses the GPUs."""

    tensor_parallel_size: int = Field(1, ge=1, json_schema_extra=RUNTIME_ONLY,
                                      description="GPUs one engine spans (a model too large for one GPU).")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, json_schema_extra=RUNTIME_ONLY,
        description="Share of each GPU's memory the engine takes for weights and KV cache; lower it when something "
                    "else runs on the same GPU.")
    max_model_len: int | None = Field(
        None, ge=1, description="Context the engine reserves KV cache for (None: the model's own); a conversation "
                                "longer than it less max_new_tokens is not sent (finish_reason context_overflow).")


class GeneratorConfig(StrictModel):
    """One model that answers every instruction."""

    name: str = Field(min_length=1, description="Label of this generator in the candidates table, plots and metrics.")
    backend: Literal["transformers", "vllm", "openai"] = Field(
        "transformers", description="'transformers': batched generate (left padding, chat template); 'vllm': needs "
                                    "the vllm extra and CUDA; 'openai': an OpenAI-compatible HTTP endpoint.")
    model: ModelConfig | None = Field(None, description="The model (transformers and vllm backends).")
    endpoint: EndpointConfig | None = Field(None, description="The endpoint (openai backend).")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Decoding parameters.")
    batch_size: int = Field(8, ge=1, description="Prompts per generate call (transformers backend).")
    vllm: VllmSettings = Field(default_factory=VllmSettings, description="The vLLM engine's GPU use (backend 'vllm').")
    scale_out: ScaleOutConfig | None = scale_out_field("Generate")

    @field_validator("name")
    @classmethod
    def _label(cls, value: str) -> str:
        if not _LABEL.match(value):
            raise ValueError(f"generator name {value!r}: use letters, digits and _ . : - (it becomes a metric key)")
        return value

    @model_validator(mode="after")
    def _backend_needs(self):
        if self.backend == "openai":
            if self.endpoint is None or self.model is not None:
                raise ValueError(f"generator {self.name!r}: backend 'openai' needs 'endpoint' and no 'model'")
        elif self.model is None or self.endpoint is not None:
            raise ValueError(f"generator {self.name!r}: backend {self.backend!r} needs 'model' and no 'endpoint'")
        # compared with the defaults, not "was it given": a dumped config (the Prefect form) holds every section
        if self.backend != "vllm" and self.vllm != VllmSettings():
            raise ValueError(f"generator {self.name!r}: 'vllm' settings apply to backend 'vllm' only (this one is "
                             f"{self.backend!r})")
        return self


class CandidatesFile(StrictModel):
    """Bring your own candidates: a file with several responses per instruction."""

    path: str = Field(min_length=1, json_schema_extra=INPUT_FILE, description="Cherry-style `{Meta_Info, data:[{<prompt field>, Answer1, Answer2, ...}]}` "
                                  "JSON, or UltraFeedback-style rows with `instruction`/`prompt` and a "
                                  "`completions` list (JSON array or JSONL).")
    format: Literal["auto", "answers", "completions"] = Field(
        "auto", description="'answers': AnswerN fields; 'completions': a list of {model, response}; 'auto' detects.")
    generator_labels: dict[str, str] = Field(
        default_factory=dict, description="Rename generators, e.g. {Answer1: cherry-5pct-7b, Answer2: alpaca-7b}.")
    on_error: Literal["raise", "skip"] = Field(
        "skip", description="'skip' writes unusable candidates/rows (e.g. an empty answer) to rejects.jsonl and "
                            "counts them; 'raise' stops at the first.")
    limit: int | None = Field(None, ge=1, description="Use only the first N instructions (quick trials).")

    @field_validator("generator_labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        # The keys become MLflow param names (selection.candidates.generator_labels.<key>), which MLflow refuses
        # with other characters or when they are not a normalised path: refused here, not after the stages ran.
        refused = [k for k in value if not _PARAM_KEY.match(k) or posixpath.normpath(f"p.{k}") != f"p.{k}"]
        if refused:
            raise ValueError(f"generator_labels keys {refused}: MLflow refuses them in param names (use letters, "
                             "digits and _ - . / space, with no trailing or doubled / and no . or .. between /); "
                             "rename that generator in the candidates file, or leave it unlabelled")
        bad = [v for v in value.values() if not _LABEL.match(v)]
        if bad:
            raise ValueError(f"generator labels {bad}: use letters, digits and _ . : -")
        if len(set(value.values())) != len(value):
            raise ValueError("generator labels must be distinct")
        return value


class DpoPairsConfig(StrictModel):
    """Beyond the paper: preference pairs from the same fit scores (chosen = best fit, rejected = worst fit)."""

    enabled: bool = Field(False, description="Write pairs.jsonl (TRL conversational preference rows).")
    min_margin: float = Field(0.0, ge=0, description="Keep a pair only if fit(best) - fit(worst) >= this "
                                                      "(in the criterion's units); identical texts never pair.")


class GrapeSelection(StrictModel):
    """GRAPE: per instruction keep the candidate response the target model finds most probable."""

    model_config = ConfigDict(title="grape")  # its button in the Prefect form

    method: Literal["grape"] = Field("grape", description="Which selection method this section configures.")
    target: ModelConfig = Field(description="The base model to be fine-tuned; candidates are scored under it.")
    generators: list[GeneratorConfig] = Field(default_factory=list, description="Models that answer the instructions.")
    candidates: CandidatesFile | None = Field(None, description="Existing candidates instead of generators.")
    on_generator_failure: Literal["fail", "continue"] = Field(
        "fail", description="'fail': the flow fails after every generator has run (finished generators stay cached, "
                            "a rerun resumes); 'continue': select among the generators that succeeded, and record "
                            "the failed ones in metrics, summary and failed_generators.json.")
    generation_shard_size: int = Field(64, ge=1, description="Instructions per resumable generation shard.")
    criterion: Criterion = Field(
        "mean_logprob", description="'mean_logprob' (paper): mean log-prob per scored token; 'sum_logprob': total; "
                                    "'per_byte': total log-prob per UTF-8 byte of the response.")
    score_end_of_turn: bool = Field(
        True, description="Also score the template's end-of-turn marker after the response, so a truncated "
                          "response pays for not ending there; false scores the response tokens only, the "
                          "paper's rule.")
    prefix_reuse: bool = Field(
        False, description="Run each instruction's prompt once and score all candidates from its KV cache (same "
                           "numbers as K full passes). Off by default: measured 0.75-1.1x of K batched passes on CPU "
                           "(bench/README.md); worth trying with long shared prompts and many candidates.")
    max_length: int = Field(2048, ge=8, description="Prompt + response tokens above this are rejected "
                                                    "(written to rejects.jsonl), never truncated.")
    batch_size: int = Field(8, ge=1, description="Candidates per forward pass when scoring.")
    scoring_shard_size: int = Field(128, ge=1, description="Instructions per resumable scoring shard.")
    dpo: DpoPairsConfig = Field(default_factory=DpoPairsConfig, description="Preference pairs from the same scores.")
    budget: int | None = Field(None, ge=1, description="Beyond the paper: keep only the N instructions whose "
                                                       "winner fits best (None with no share = keep all, as GRAPE).")
    share: float | None = Field(None, gt=0, le=1, description="Like budget, as a share of the instructions.")

    @model_validator(mode="after")
    def _source(self):
        if bool(self.generators) == (self.candidates is not None):
            raise ValueError("give exactly one of 'generators' (a non-empty list) or 'candidates'")
        names = [g.name for g in self.generators]
        if len(set(names)) != len(names):
            raise ValueError(f"generator names must be distinct, got {names}")
        if self.budget is not None and self.share is not None:
            raise ValueError("give at most one of 'budget' or 'share'")
        return self

    def count(self, n: int) -> int:
        """How many instructions to keep out of n (all of them unless a budget or share is set)."""
        if self.budget is not None:
            return min(self.budget, n)
        if self.share is not None:
            return share_count(self.share, n)
        return n


class GrapeRecipe(StrictModel):
    """A stand-alone GRAPE run: (instructions) -> candidates -> fit -> SFT set (+ DPO pairs)."""

    name: str = Field(min_length=1, description="Recipe name; also the MLflow experiment unless tracking.experiment is set.")
    data: DataConfig | None = Field(None, description="Instructions to answer (needed with generators; responses in "
                                                      "the file are ignored). Not used with a candidates file.")
    selection: GrapeSelection = Field(description="Target model, generators or a candidates file, criterion and pairs.")
    output_format: Literal["source", "alpaca", "sharegpt", "messages"] = Field(
        "source", description="Format of subset.jsonl ('source' keeps the instruction file's format).")
    tracking: TrackingConfig = tracking_field()

    @model_validator(mode="after")
    def _data_matches_source(self):
        if self.selection.generators and self.data is None:
            raise ValueError("selection.generators need 'data' (the instructions to answer)")
        if self.selection.candidates is not None and self.data is not None:
            raise ValueError("with selection.candidates the instructions come from that file: remove 'data'")
        return self

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name
