"""Deita scorers: the expected complexity / quality score read off one next-token distribution.

A scorer model sees the reference prompt (below, exactly as in Deita's code) and the score is
`sum_i p_i * i` for i in 1..6, with `p = softmax` over the logits of the six tokens "1".."6" at the first generated
position (the position after the prompt's last token). Deita's reference returns 3.0 silently whenever a lookup
fails; here a digit that is not one token, a non-finite logit or an over-long prompt is an error.

The released scorers (`hkust-nlp/deita-complexity-scorer`, `hkust-nlp/deita-quality-scorer`) are used when their
weights are present; any other causal LM works as an *approximate* scorer (it was not trained for the prompt), and
the scorer says which it is in `params()` so the run records it.

Differences from the reference, on purpose: the reference reads `generate(...).scores[0]`, i.e. logits after the
generation config's logits processors; we read the raw logits (identical for greedy decoding without penalties,
which is how the released scorers are configured). Prompts are batched with right padding; each prompt's score
comes from its own last real token, so batching does not change scores beyond float rounding.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from configs.errors import ConfigError, ScoringError
from models.embeddings import right_padded

Dimension = Literal["complexity", "quality"]
ScorerKind = Literal["auto", "reference", "approximate"]

# Exactly the reference's Python string literals (deita/selection/scorer/llama_scorer.py).
COMPLEXITY_TEMPLATE = ("You are a helpful assistant. Please identify the complexity score of the following user query. \n"
                       "##Query: {instruction}  \n##Complexity: ")
QUALITY_TEMPLATE = ("You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
                    "Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: ")
SCORE_TOKENS = ("1", "2", "3", "4", "5", "6")
REFERENCE_SCORERS = {"complexity": "hkust-nlp/deita-complexity-scorer", "quality": "hkust-nlp/deita-quality-scorer"}


def complexity_prompt(instruction: str) -> str:
    return COMPLEXITY_TEMPLATE.format(instruction=instruction)


def quality_prompt(instruction: str, output: str) -> str:
    return QUALITY_TEMPLATE.format(instruction=instruction, output=output)


def single_token_ids(tokenizer, labels: Sequence[str], purpose: str) -> list[int]:
    """The vocabulary id of each label, whose next-token logit is read (Deita's score digits, a judge's verdicts).

    The vocabulary entry is preferred when it decodes back to the label (for Llama's SentencePiece this is the bare
    digit piece the Deita reference uses, id 29896 for "1", while `encode("1")` gives a word-start piece and the
    digit); otherwise the label must encode to exactly one token, not the unknown token. A label that is neither,
    or two labels sharing an id, is a ScoringError naming `purpose` and the label: one logit cannot stand for it.
    """
    ids: list[int] = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for label in labels:
        token_id = tokenizer.convert_tokens_to_ids(label)
        if token_id is None or token_id == unk or tokenizer.decode([token_id]).strip() != label:
            encoded = tokenizer.encode(label, add_special_tokens=False)
            if len(encoded) != 1 or (unk is not None and encoded[0] == unk):
                raise ScoringError(
                    f"{purpose} label {label!r} is not a single token in this tokenizer (it encodes to {encoded}): "
                    "its probability cannot be read off one next-token distribution; use another model")
            token_id = encoded[0]
        ids.append(int(token_id))
    if len(set(ids)) != len(ids):
        raise ScoringError(f"{purpose} labels {list(labels)} map to repeated ids {ids}: the tokenizer cannot tell "
                           "them apart")
    return ids


def score_token_ids(tokenizer) -> list[int]:
    """The vocabulary ids of "1".."6" (see `single_token_ids`)."""
    return single_token_ids(tokenizer, SCORE_TOKENS, "Deita score")


def expected_scores(score_logits) -> np.ndarray:
    """[n, 6] logits of the tokens "1".."6" -> [n] expected scores sum_i softmax(logits)_i * i (float64)."""
    logits = np.asarray(score_logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != len(SCORE_TOKENS):
        raise ValueError(f"expected logits of shape [n, {len(SCORE_TOKENS)}], got {logits.shape}")
    if not np.isfinite(logits).all():
        bad = np.nonzero(~np.isfinite(logits).all(axis=1))[0]
        err = ScoringError(f"prompts {bad[:5].tolist()}: non-finite score-token logits")
        err.rows = bad.tolist()  # which prompts, for a caller that can name their records
        raise err
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    return probs @ np.arange(1, len(SCORE_TOKENS) + 1, dtype=np.float64)


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def next_token_logits(model, sequences: Sequence[Sequence[int]], token_ids: Sequence[int], pad_id: int,
                      batch_size: int = 8, progress: bool = False) -> np.ndarray:
    """Logits of `token_ids` at the position after each sequence's last token: [n, len(token_ids)] float32.

    Sequences are sorted by length for batching and right-padded; the head is applied only at each row's last
    real position when the model supports `logits_to_keep` (the vocabulary projection is the big activation).
    """
    import torch

    device = next(model.parameters()).device
    wanted = torch.tensor(list(token_ids), dtype=torch.long, device=device)
    out = np.zeros((len(sequences), len(token_ids)), dtype=np.float32)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    slice_head = _accepts_logits_to_keep(model)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="deita scores", unit="batch")
    for start in batches:
        idx = order[start:start + batch_size]
        empty = [i for i in idx if not sequences[i]]
        if empty:
            raise ScoringError(f"prompt {empty[0]} has no tokens")
        ids, mask = right_padded([sequences[i] for i in idx], pad_id)
        last = (mask.sum(dim=1) - 1).to(device)
        with torch.no_grad():
            if slice_head:
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               logits_to_keep=last.unsqueeze(1)).logits[:, 0]
            else:
                full = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                logits = full[torch.arange(len(idx), device=device), last]
        out[idx] = logits.float().index_select(1, wanted).cpu().numpy()
    return out


def detect_kind(name_or_path: str, dimension: Dimension, kind: ScorerKind) -> Literal["reference", "approximate"]:
    """Whether a model is a released Deita scorer for `dimension`; a scorer of the other dimension is refused."""
    base = Path(name_or_path.rstrip("/")).name.lower()
    other = "quality" if dimension == "complexity" else "complexity"
    if f"deita-{other}-scorer" in base:
        raise ConfigError(f"{name_or_path!r} is Deita's {other} scorer but is configured to score {dimension}")
    if kind != "auto":
        return kind
    return "reference" if f"deita-{dimension}-scorer" in base else "approximate"


def scorer_params(dimension: Dimension, name: str, kind: str, token_ids: Sequence[int]) -> dict[str, str]:
    """What a run records about a scorer: name, kind (reference / approximate), the score tokens, the prompt. Needs
    only the tokenizer, so a stage whose shards are all scored (or scored elsewhere) never loads the model."""
    return {f"{dimension}_scorer": name, f"{dimension}_scorer_kind": kind,
            f"{dimension}_score_token_ids": ",".join(map(str, token_ids)),
            f"{dimension}_prompt": COMPLEXITY_TEMPLATE if dimension == "complexity" else QUALITY_TEMPLATE}


class DeitaScorer:
    """A loaded scorer model for one dimension; scores prompts in batches, raises instead of defaulting."""

    def __init__(self, model, tokenizer, dimension: Dimension, name: str, kind: Literal["reference", "approximate"],
                 batch_size: int = 8, max_prompt_tokens: int | None = None):
        if dimension not in ("complexity", "quality"):
            raise ValueError(f"unknown Deita dimension {dimension!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.dimension = dimension
        self.name = name
        self.kind = kind
        self.batch_size = batch_size
        self.token_ids = score_token_ids(tokenizer)
        positions = getattr(model.config, "max_position_embeddings", None)
        limits = [v for v in (max_prompt_tokens, positions) if v]
        self.max_prompt_tokens = min(limits) if limits else None

    @classmethod
    def load(cls, model_config, dimension: Dimension, kind: ScorerKind = "auto", batch_size: int = 8,
             max_prompt_tokens: int | None = None) -> "DeitaScorer":
        from models.loading import load_model

        resolved = detect_kind(model_config.name_or_path, dimension, kind)
        model, tokenizer = load_model(model_config)
        return cls(model, tokenizer, dimension, model_config.name_or_path, resolved, batch_size, max_prompt_tokens)

    def params(self) -> dict[str, str]:
        """What the run should record about this scorer."""
        return scorer_params(self.dimension, self.name, self.kind, self.token_ids)

    def prompt(self, instruction: str, output: str | None = None) -> str:
        if self.dimension == "complexity":
            return complexity_prompt(instruction)
        if output is None:
            raise ValueError("a quality prompt needs the response")
        return quality_prompt(instruction, output)

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        # With special tokens, as the reference's `tokenizer.encode(user_input)` (BOS for Llama).
        return [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]

    def too_long(self, encoded: Sequence[Sequence[int]]) -> list[int]:
        """Indices of prompts longer than the scorer can read (they must be rejected, not truncated)."""
        if self.max_prompt_tokens is None:
            return []
        return [i for i, ids in enumerate(encoded) if len(ids) > self.max_prompt_tokens]

    def score_encoded(self, encoded: Sequence[Sequence[int]], progress: bool = False) -> np.ndarray:
        long = self.too_long(encoded)
        if long:
            raise ScoringError(f"prompts {long[:5]} are longer than {self.max_prompt_tokens} tokens")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        logits = next_token_logits(self.model, encoded, self.token_ids, pad, self.batch_size, progress)
        return expected_scores(logits)

    def score_prompts(self, prompts: Sequence[str], progress: bool = False) -> np.ndarray:
        return self.score_encoded(self.encode(prompts), progress)

    def score_turns(self, conversations: Sequence[Sequence[tuple[str, str | None]]], progress: bool = False) -> list[list[float]]:
        """Per-turn scores of each conversation: every (instruction, response) pair is scored on its own."""
        prompts, owners = [], []
        for c, turns in enumerate(conversations):
            if not turns:
                raise ValueError(f"conversation {c} has no turns")
            for instruction, response in turns:
                prompts.append(self.prompt(instruction, response))
                owners.append(c)
        scores = self.score_prompts(prompts, progress)
        grouped: list[list[float]] = [[] for _ in conversations]
        for owner, value in zip(owners, scores.tolist()):
            if not math.isfinite(value):
                raise ScoringError(f"conversation {owner}: non-finite score {value}")
            grouped[owner].append(float(value))
        return grouped
