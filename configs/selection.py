"""Selection method configs. The pipeline's `selection` field is a union discriminated by `method`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from configs.schema import Budget, StrictModel


class RandomSelection(Budget):
    """Uniform random sample at a budget (the baseline every method must beat)."""

    method: Literal["random"] = "random"
    seed: int = Field(0, description="Sampling seed.")


class LongestSelection(Budget):
    """The samples with the longest responses (a strong baseline in the literature)."""

    method: Literal["longest"] = "longest"


class FullSelection(StrictModel):
    """All samples: the no-selection reference."""

    method: Literal["full"] = "full"
