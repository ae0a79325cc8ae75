"""Selection method configs. The pipeline's `selection` field is a union discriminated by `method`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from configs.schema import Budget, StrictModel


class RandomSelection(Budget):
    """Uniform random sample at a budget (the baseline every method must beat)."""

    method: Literal["random"] = Field("random", description="Which selection method this section configures.")
    seed: int = Field(0, description="Sampling seed.")


class LongestSelection(Budget):
    """The samples with the longest responses (a strong baseline in the literature)."""

    method: Literal["longest"] = Field("longest", description="Which selection method this section configures.")


class FullSelection(StrictModel):
    """All samples: the no-selection reference."""

    method: Literal["full"] = Field("full", description="Which selection method this section configures.")
