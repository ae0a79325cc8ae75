"""Comparison config: several selection methods at one data budget, trained and evaluated identically."""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import Field, model_validator

from configs.evaluate import EvaluateConfig
from configs.pipeline import SelectionConfig
from configs.schema import DataConfig, StrictModel, TrackingConfig, tracking_field
from configs.train import TrainingConfig


def _selection_classes() -> dict[str, type]:
    """method name -> its config class, read from the pipeline's discriminated union (new methods join by themselves)."""
    union = typing.get_args(SelectionConfig)[0]
    return {cls.model_fields["method"].default: cls for cls in typing.get_args(union)}


def takes_budget(cls: type) -> bool:
    """Whether a method's config keeps a budget or share (the Budget methods, and GRAPE, whose budget is optional)."""
    return isinstance(cls, type) and {"budget", "share"} <= set(getattr(cls, "model_fields", {}))


class CompareConfig(StrictModel):
    """One recipe = one comparison: for each method select -> train (same settings and seed) -> evaluate."""

    name: str = Field(min_length=1, description="Recipe name; also the MLflow experiment unless tracking.experiment is set.")
    data: DataConfig = Field(description="The candidate pool every method selects from.")
    budget: int | None = Field(None, ge=1, description="Samples every budgeted method keeps (methods without a budget of their own get it).")
    share: float | None = Field(None, gt=0, le=1, description="Instead of `budget`: the share of the pool every budgeted method keeps.")
    methods: list[SelectionConfig] = Field(min_length=1, description=(
        "Selection methods to compare; give each one's own settings, leave budget/share out to use the shared one."))
    output_format: Literal["source", "alpaca", "sharegpt", "messages"] = Field(
        "source", description="Format of each subset.jsonl (training always reads subset.messages.jsonl).")
    training: TrainingConfig = Field(description="Base model and SFT/DPO settings, identical for every method.")
    evaluate: EvaluateConfig = Field(description="Evaluations run on every trained model.")
    evaluate_base: bool = Field(True, description="Also evaluate the untrained base model as the row 'base'.")
    plot_metrics: list[str] = Field(default_factory=list, description=(
        "Metrics (e.g. 'likelihood/mean_nll') drawn as one chart each (methods against the base model); empty: "
        "every metric the methods share."))
    tracking: TrackingConfig = tracking_field()

    @model_validator(mode="before")
    @classmethod
    def _shared_budget(cls, raw: Any):
        """Give the shared budget to every method that takes one and names none itself."""
        if not isinstance(raw, dict):
            return raw
        if (raw.get("budget") is None) == (raw.get("share") is None):
            raise ValueError("give exactly one of 'budget' or 'share' for the comparison")
        classes = _selection_classes()
        methods = []
        for item in raw.get("methods") or []:
            if isinstance(item, dict) and takes_budget(classes.get(item.get("method"))):
                if item.get("budget") is None and item.get("share") is None:
                    item = {**item, "budget": raw.get("budget"), "share": raw.get("share")}
                elif (item.get("budget"), item.get("share")) != (raw.get("budget"), raw.get("share")):
                    raise ValueError(f"method {item.get('method')!r} sets its own budget/share; a comparison keeps one "
                                     "budget for all methods (remove it from the method)")
            methods.append(item)
        return {**raw, "methods": methods}

    @model_validator(mode="after")
    def _runnable(self):
        if self.training.sft is None:
            raise ValueError("the comparison trains every method with SFT: set training.sft")
        if self.training.dpo is not None:
            raise ValueError("the comparison trains every method with SFT only: remove training.dpo (run DPO with "
                             "the pipeline flow on the method you pick)")
        inst = self.evaluate.instruction
        if inst is not None and inst.pairwise and inst.baseline_model is None and not inst.baseline_answers:
            raise ValueError("evaluate.instruction.pairwise needs a baseline (e.g. baseline_model = training.model)")
        return self

    def form_defaults(self) -> dict[str, Any]:
        """This config as the Prefect form's default: the methods without the shared budget/share copied into them,
        so a budget edited in the form applies to every method (with the copies it would clash with them). They stay
        as empty fields (None: take the shared one), not removed: the form tells a method by its field names, and a
        `longest` item holding `method` alone could not be told from a `full` one (`configs/form_schema.py`)."""
        dumped = self.model_dump(mode="json")
        for method, item in zip(self.methods, dumped["methods"]):
            if takes_budget(type(method)):
                item["budget"] = item["share"] = None
        return dumped

    def labels(self) -> list[str]:
        """A unique row label per method: its name, numbered when a method appears twice."""
        names = [m.method for m in self.methods]
        return [n if names.count(n) == 1 else f"{n}-{names[:i + 1].count(n)}" for i, n in enumerate(names)]

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name
