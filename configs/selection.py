"""Selection method configs. The pipeline's `selection` field is a union discriminated by `method`."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from configs.schema import Budget, StrictModel


class RandomSelection(Budget):
    """Uniform random sample at a budget (the baseline every method must beat)."""

    model_config = ConfigDict(title="random")  # its button in the Prefect form

    method: Literal["random"] = Field("random", description="Which selection method this section configures.")
    seed: int = Field(0, description="Sampling seed.")


class LongestSelection(Budget):
    """The samples with the longest responses (a strong baseline in the literature)."""

    model_config = ConfigDict(title="longest")  # its button in the Prefect form

    method: Literal["longest"] = Field("longest", description="Which selection method this section configures.")


class FullSelection(StrictModel):
    """All samples: the no-selection reference."""

    model_config = ConfigDict(title="full")  # its button in the Prefect form

    method: Literal["full"] = Field("full", description="Which selection method this section configures.")
