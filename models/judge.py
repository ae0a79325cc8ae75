"""A local judge model read through the logits of its verdict tokens (deterministic: nothing is sampled).

Pairwise: the judge sees the question and two responses and we read P("1") vs P("2") at its first answer
position. Every pair is judged in BOTH orders (candidate first, then baseline first), so a judge that simply
prefers a position scores a tie instead of a win: win = better in both orders, or better in one and tied in the
other; lose = the mirror; anything else is a tie (the rule of the Cherry/AlpacaEval-style GPT-4 evaluation).

Single answer: Deita's quality scorer formula - the expected score sum_i p_i * i over the softmax of the logits
of the tokens "1".."6" (models/deita.py owns that formula and the batched next-token logits; reused here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


PAIRWISE_PROMPT = (
    "You are a fair judge. Compare the two responses to the user's question below and decide which one is more "
    "helpful, relevant, accurate and detailed. Do not let the order of the responses or their length influence you."
    "\n\n[Question]\n{question}\n\n[Response 1]\n{first}\n\n[Response 2]\n{second}\n\n"
    "Which response is better? Answer with a single digit: 1 or 2."
)
VERDICT_LABELS = ("1", "2")


def softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def order_outcome(p_candidate: float, tie_margin: float = 0.0) -> int:
    """+1 when the judge prefers the candidate in one order, -1 when it prefers the baseline, 0 within the margin."""
    if p_candidate > 0.5 + tie_margin:
        return 1
    if p_candidate < 0.5 - tie_margin:
        return -1
    return 0


def combine_orders(first: int, second: int) -> str:
    """Both orders' outcomes -> win / tie / lose (win+lose, as a position-biased judge gives, is a tie)."""
    total = first + second
    return "win" if total > 0 else "lose" if total < 0 else "tie"


@dataclass(frozen=True)
class PairVerdict:
    p_candidate_first: float   # P(candidate better) when the candidate is shown as Response 1
    p_candidate_second: float  # P(candidate better) when the candidate is shown as Response 2
    outcome: str               # win / tie / lose, from the candidate's side


class LogitJudge:
    """Pairwise and single-answer judging with one loaded judge model."""

    def __init__(self, model, tokenizer, name: str = "judge", use_chat_template: bool = True, tie_margin: float = 0.0,
                 max_answer_tokens: int = 512, batch_size: int = 4):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.tie_margin = tie_margin
        self.max_answer_tokens = max_answer_tokens
        self.batch_size = batch_size
        from models.deita import single_token_ids

        self.verdict_ids = single_token_ids(tokenizer, VERDICT_LABELS, "judge verdict")

    def _cut(self, text: str) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return text if len(ids) <= self.max_answer_tokens else self.tokenizer.decode(ids[: self.max_answer_tokens])

    def pairwise_prompt(self, question: str, first: str, second: str) -> str:
        text = PAIRWISE_PROMPT.format(question=question, first=self._cut(first), second=self._cut(second))
        if self.use_chat_template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text + "\nAnswer: "

    def pairwise(self, questions: Sequence[str], candidates: Sequence[str], baselines: Sequence[str]) -> list[PairVerdict]:
        """Judge each (candidate, baseline) pair in both orders."""
        if not (len(questions) == len(candidates) == len(baselines)):
            raise ValueError("questions, candidates and baselines must have the same length")
        prompts = [self.pairwise_prompt(q, c, b) for q, c, b in zip(questions, candidates, baselines)]
        prompts += [self.pairwise_prompt(q, b, c) for q, c, b in zip(questions, candidates, baselines)]
        from models.deita import next_token_logits

        # A templated prompt already holds its special tokens; a raw one gets BOS as a plain encode does.
        encoded = [self.tokenizer.encode(p, add_special_tokens=not self.use_chat_template) for p in prompts]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        logits = next_token_logits(self.model, encoded, self.verdict_ids, pad, self.batch_size).tolist()
        n = len(questions)
        verdicts = []
        for i in range(n):
            p_first = softmax(logits[i])[0]        # candidate is Response 1
            p_second = softmax(logits[n + i])[1]   # candidate is Response 2
            outcome = combine_orders(order_outcome(p_first, self.tie_margin), order_outcome(p_second, self.tie_margin))
            verdicts.append(PairVerdict(p_first, p_second, outcome))
        return verdicts

    def quality(self, questions: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Deita's quality score (expected score over "1".."6") of each answer to its question."""
        scorer = self.quality_scorer()
        return scorer.score_prompts([scorer.prompt(q, self._cut(a)) for q, a in zip(questions, answers)]).tolist()

    def quality_scorer(self):
        """Deita's scorer on this judge model ('reference' when it is hkust-nlp/deita-quality-scorer)."""
        from models.deita import DeitaScorer, detect_kind

        return DeitaScorer(self.model, self.tokenizer, "quality", self.name, detect_kind(self.name, "quality", "auto"),
                           self.batch_size)


def summarize_pairwise(verdicts: Sequence[PairVerdict]) -> dict[str, float]:
    """Win/tie/lose rates and the usual single number: (wins - losses) / n + 1, in [0, 2] (1 = on par)."""
    n = len(verdicts)
    if n == 0:
        return {}
    wins = sum(v.outcome == "win" for v in verdicts)
    ties = sum(v.outcome == "tie" for v in verdicts)
    losses = sum(v.outcome == "lose" for v in verdicts)
    return {"win_rate": wins / n, "tie_rate": ties / n, "lose_rate": losses / n,
            "winning_score": (wins - losses) / n + 1, "pairs": float(n)}
