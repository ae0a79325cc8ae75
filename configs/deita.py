"""Deita selection config: two scorers, an embedder, the evol score and the diversity filter."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from configs.runner import ScaleOutConfig, scale_out_field
from configs.schema import RUNTIME_ONLY, Budget, ModelConfig, SelectionFlowBase, StrictModel

DEFAULT_BUDGET = 6000  # Deita's released 6K subsets


class DeitaScorerConfig(StrictModel):
    """A Deita scorer: the released checkpoint for its dimension, or any causal LM as an approximate scorer."""

    model: ModelConfig = Field(description="Scorer model: e.g. hkust-nlp/deita-complexity-scorer (or its local folder), "
                                           "or any local causal LM, which then scores only approximately.")
    kind: Literal["auto", "reference", "approximate"] = Field(
        "auto", description="'auto' = 'reference' when the name is Deita's released scorer for this dimension, else "
                            "'approximate'. Recorded with the scores so runs say which they used.")
    batch_size: int = Field(8, ge=1, description="Prompts per forward pass.")
    max_prompt_tokens: int | None = Field(
        None, ge=8, description="Reject (never truncate) records whose prompt is longer; None = the model's context length.")
    shard_size: int = Field(256, ge=1, description="Records per resumable shard of the scoring stage.")
    scale_out: ScaleOutConfig | None = scale_out_field("Score")


class DeitaEmbeddingConfig(StrictModel):
    """The embedder for the diversity filter (Deita: the final hidden state of the last token, vicuna template)."""

    model: ModelConfig = Field(description="Causal LM whose final hidden states embed each whole conversation.")
    pooling: Literal["last", "mean"] = Field(
        "last", description="'last' = last non-pad token (Deita); 'mean' = mean over the conversation's tokens.")
    max_length: int = Field(2048, ge=8, description="Tokens kept per conversation (truncated from the right), as Deita's embedder.")
    batch_size: int = Field(8, ge=1, description="Conversations per forward pass.")
    shard_size: int = Field(512, ge=1, description="Conversations per resumable embedding shard.")
    scale_out: ScaleOutConfig | None = scale_out_field("Embed")


class DeitaSelection(Budget):
    """Deita: rank by complexity x quality (summed over turns), then keep greedily unless too similar to a kept sample."""

    model_config = ConfigDict(title="deita")  # its button in the Prefect form

    method: Literal["deita"] = Field("deita", description="Which selection method this section configures.")
    complexity_scorer: DeitaScorerConfig | None = Field(
        None, description="Complexity scorer; needed for score 'evol' and 'complexity'.")
    quality_scorer: DeitaScorerConfig | None = Field(
        None, description="Quality scorer; needed for score 'evol' and 'quality'.")
    embedding: DeitaEmbeddingConfig = Field(description="Embedder for the diversity filter.")
    score: Literal["evol", "complexity", "quality"] = Field(
        "evol", description="Ranking score: 'evol' = sum over turns of complexity x quality (Deita); the others sum "
                            "one dimension over turns.")
    tau: float = Field(0.9, gt=0.0, le=1.0, description="A candidate is rejected when its cosine similarity to any "
                                                          "already-kept sample is greater than tau.")
    # The filter's knobs change its speed and memory only: the selection is the same, so they stay out of keys.
    filter_block_size: int = Field(1024, ge=1, json_schema_extra=RUNTIME_ONLY,
                                   description="Candidates compared per matrix product in the filter.")
    filter_device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=RUNTIME_ONLY,
                                                          description="Where the filter's matrix products run.")
    filter_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", json_schema_extra=RUNTIME_ONLY,
        description="dtype of the filter's matrix products: 'auto' = bfloat16 on a CPU with native bfloat16 matrix "
                    "units, float32 elsewhere. The selection is exact either way (similarities near tau are "
                    "recomputed in float32, then exactly).")

    # Deita's released subsets' size when the recipe names neither budget nor share; `pomona fields` prints it.
    implied_defaults: ClassVar[dict[str, Any]] = {"budget": DEFAULT_BUDGET}

    @model_validator(mode="before")
    @classmethod
    def _default_budget(cls, data):
        if isinstance(data, dict) and data.get("budget") is None and data.get("share") is None:
            data = {**data, "budget": cls.implied_defaults["budget"]}
        return data

    @model_validator(mode="after")
    def _scorers_for_score(self):
        if self.score in ("evol", "complexity") and self.complexity_scorer is None:
            raise ValueError(f"score '{self.score}' needs a complexity_scorer")
        if self.score in ("evol", "quality") and self.quality_scorer is None:
            raise ValueError(f"score '{self.score}' needs a quality_scorer")
        if self.filter_device == "cuda" and self.filter_precision == "bfloat16":
            raise ValueError("filter_precision 'bfloat16' is for CPUs (its error margin assumes float32 "
                             "accumulation, which cuBLAS does not promise); use auto or float32 on cuda")
        return self


class DeitaFlowConfig(SelectionFlowBase):
    """Deita on its own (the `pomona-deita` flow): records -> scores -> embeddings -> filtered subset."""

    name: str = Field("deita", min_length=1, description="Run name; also the MLflow experiment unless tracking.experiment is set.")
    selection: DeitaSelection = Field(description="Deita scorers, embedding model, tau and budget.")
