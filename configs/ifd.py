"""Configs of the likelihood scoring stage and of the two IFD selections (Cherry, Superfiltering)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from configs.runner import ScaleOutConfig, scale_out_field
from configs.schema import Budget, ModelConfig, SelectionFlowBase, StrictModel
from configs.train import SFTStageConfig


ScoringTemplate = Literal["wiz", "alpaca", "superfilter", "chat"]
ShareOf = Literal["all", "filtered"]


class ScoringConfig(StrictModel):
    """How the likelihood stage scores every sample: conditioned on its prompt and direct (see models/templates.py)."""

    scorer: ModelConfig = Field(description="The model whose likelihoods are measured.")
    template: ScoringTemplate = Field(
        "wiz", description="Prompt format: Cherry's 'wiz' or 'alpaca', Superfiltering's plain 'superfilter' "
                           "({instruction}\\n{input}\\n), or the scorer's own 'chat' template.")
    max_length: int = Field(512, ge=8, description="Token limit of a scored sequence (Cherry 512, Superfiltering 1024).")
    overlong: Literal["truncate", "skip"] = Field(
        "truncate", description="Prompt + answer longer than max_length: 'truncate' as the reference does (counted "
                                "as truncated) or 'skip' the sample (written to rejects).")
    batch_size: int = Field(16, ge=1, description="Most sequences per forward pass.")
    max_batch_tokens: Annotated[int, Field(ge=64)] | Literal["auto"] = Field(
        "auto", description="Most padded tokens per forward pass (bounds memory); 'auto' = 1024 on CPU for a model "
                            "as wide as SmolLM2-135M (larger batches measured slower there), more for a narrower one "
                            "(same activation size, up to 8192), 16384 on CUDA.")
    shard_size: int = Field(512, ge=1, description="Samples per parquet shard; a killed run resumes at the next unfinished shard.")
    scale_out: ScaleOutConfig | None = scale_out_field("Score")


class IFDRule(StrictModel):
    """Which IFD, which samples pass, and how many are kept."""

    threshold: float = Field(1.0, gt=0, description="Samples with IFD above this are dropped (the papers use 1).")
    strict: bool = Field(False, description="Also drop IFD equal to the threshold (Superfiltering keeps ifd < 1; Cherry drops ifd > 1).")
    share_of: ShareOf = Field(
        "filtered", description="What `share` is a share of: 'all' scored-or-not samples, or those left after the "
                                "threshold (Cherry's reference).")


class PreExperienceConfig(StrictModel):
    """Cherry's pre-experienced scorer: cluster instruction embeddings, pick mid-perplexity samples, brief SFT."""

    n_clusters: int = Field(100, ge=1, description="KMeans clusters over the mean-pooled instruction embeddings.")
    per_cluster: int = Field(10, ge=1, description="Samples taken per cluster: a smaller cluster whole, else an even stride (in dataset order) over the band.")
    band: tuple[float, float] = Field((25.0, 75.0), description="Perplexity percentile band kept inside each cluster.")
    seed: int = Field(0, description="KMeans random_state (the reference uses 0).")
    n_init: int = Field(10, ge=1, description="KMeans restarts (scikit-learn's default when the reference was written).")
    embed_batch_size: int = Field(16, ge=1, description="Instructions per forward pass when embedding.")
    sft: SFTStageConfig = Field(
        default_factory=lambda: SFTStageConfig(num_train_epochs=1.0),
        description="The brief SFT of the scorer on the picked samples (the reference trains 1 epoch).")

    @model_validator(mode="after")
    def _band(self):
        low, high = self.band
        if not 0 <= low < high <= 100:
            raise ValueError(f"band must satisfy 0 <= low < high <= 100, got {self.band}")
        if self.sft.lora is not None and not self.sft.merge_adapter:
            raise ValueError("sft with lora needs merge_adapter: true, so the pre-experienced scorer is a full model")
        return self


class CherrySelection(Budget):
    """Cherry (IFD v1): ratio of mean losses, scored by a pre-experienced model, drop IFD > 1, keep the top."""

    model_config = ConfigDict(title="cherry")  # its button in the Prefect form

    method: Literal["cherry"] = Field("cherry", description="Which selection method this section configures.")
    scoring: ScoringConfig = Field(description="Scorer model, template ('wiz' by default) and truncation.")
    rule: IFDRule = Field(default_factory=IFDRule, description="Threshold, strictness and what the share counts.")
    pre_experience: PreExperienceConfig | None = Field(
        default_factory=PreExperienceConfig,
        description="Train the scorer briefly on clustered mid-perplexity samples first; None scores with the raw model.")


class DiversityConfig(StrictModel):
    """Superfiltering.D: facility-location selection over embeddings of the IFD-selected samples."""

    budget: int = Field(ge=1, description="Samples kept after the diversity step (at most the IFD step's count).")
    embedder: ModelConfig | None = Field(None, description="Model for the sentence embeddings; None = the scorer.")
    pooling: Literal["mean", "last"] = Field("mean", description="How hidden states become one vector per sample.")
    batch_size: int = Field(16, ge=1, description="Texts per forward pass when embedding.")
    max_length: int = Field(512, ge=8, description="Token limit of an embedded text (instruction + input + output).")
    kernel: Literal["euclidean", "cosine"] = Field(
        "euclidean", description="Facility-location similarity: 'euclidean' = exp(-distance / dimension) as the "
                                 "authors' submodlib call, or 'cosine' (negative similarities count as 0).")


class SuperfilterScoring(ScoringConfig):
    """The scoring section with Superfiltering's defaults (the paper's plain template and 1024 tokens), so the
    schema, the Prefect form and `pomona fields` show what a recipe that leaves them out runs with."""

    template: ScoringTemplate = Field("superfilter", description=ScoringConfig.model_fields["template"].description)
    max_length: int = Field(1024, ge=8, description=ScoringConfig.model_fields["max_length"].description)


class SuperfilterRule(IFDRule):
    """The IFD rule with Superfiltering's defaults: keep ifd < 1, and a share of all samples."""

    strict: bool = Field(True, description=IFDRule.model_fields["strict"].description)
    share_of: ShareOf = Field("all", description=IFDRule.model_fields["share_of"].description)


class SuperfilterSelection(Budget):
    """Superfiltering (IFD v2): ratio of perplexities from a small scorer, keep ifd < 1, top share; optional D step."""

    model_config = ConfigDict(title="superfilter")  # its button in the Prefect form

    method: Literal["superfilter"] = Field("superfilter", description="Which selection method this section configures.")
    scoring: SuperfilterScoring = Field(description="Small scorer model; template 'superfilter' and max_length 1024 (the paper's) unless set here.")
    rule: SuperfilterRule = Field(default_factory=SuperfilterRule,
                                  description="Threshold, strictness and what the share counts.")
    diversity: DiversityConfig | None = Field(None, description="Facility-location step to a second, smaller budget.")

    @field_validator("scoring", "rule", mode="before")
    @classmethod
    def _shared_section(cls, value):
        """A Cherry-default section object (ScoringConfig, IFDRule) counts by the fields it sets, as a mapping
        does: the ones it leaves out take Superfiltering's defaults, not Cherry's."""
        if isinstance(value, (ScoringConfig, IFDRule)) and not isinstance(value, (SuperfilterScoring, SuperfilterRule)):
            return value.model_dump(exclude_unset=True)
        return value

    @model_validator(mode="after")
    def _second_budget(self):
        if self.diversity is not None and self.budget is not None and self.diversity.budget > self.budget:
            raise ValueError(f"diversity.budget ({self.diversity.budget}) exceeds the IFD budget ({self.budget})")
        return self


class CherryFlowConfig(SelectionFlowBase):
    """Cherry on its own (the `pomona-cherry` flow): records -> pre-experience -> scores -> IFD subset."""

    name: str = Field("cherry", min_length=1, description="Run name; also the MLflow experiment unless tracking.experiment is set.")
    selection: CherrySelection = Field(description="Scorer, template, pre-experience, IFD rule and budget.")


class SuperfilterFlowConfig(SelectionFlowBase):
    """Superfiltering on its own (the `pomona-superfilter` flow): records -> scores -> IFD subset (-> diversity)."""

    name: str = Field("superfilter", min_length=1, description="Run name; also the MLflow experiment unless tracking.experiment is set.")
    selection: SuperfilterSelection = Field(description="Small scorer, template, IFD rule, budget and optional diversity step.")
