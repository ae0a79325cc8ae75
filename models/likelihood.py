"""The likelihood engine: per-sample NLL of target tokens given everything before them.

Cherry/IFD, Superfiltering and GRAPE all reduce to this one operation. Callers build token sequences (templates
and truncation rules live in `models/templates.py`); the engine batches them and returns sums and counts.

How it is fast without changing the numbers:
- requests are sorted by length and cut into batches under a token budget, so padding is small and each batch is
  one large matrix multiply per layer (right padding under the plain causal mask: real tokens never see pads);
- the transformer body runs once per batch, and the LM head (vocabulary projection, about a fifth of a small
  model's FLOPs) runs only on the positions that predict a target token, in cache-sized tiles whose logsumexp is
  combined in float32 (`head_nll`), after the family's own logit scaling or soft-capping (`head_transform`); the
  split is checked once per model against the model's own forward, and a model it does not reproduce is scored
  from its full logits, with a warning;
- no gradients (`inference_mode`), fp32 on CPU and the model's bf16/fp16 on CUDA (the loader picks the dtype).

`reference_scores` is the reference implementations' way (one sample at a time, `model(ids, labels=...).loss`);
tests and the benchmark hold the engine against it. `cherry_token_loop_scores` adds Cherry's per-token Python loop
(its `token_loss` lists), which is what the authors' scoring run actually costs.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from configs.errors import ScoringError


@dataclass(frozen=True)
class ScoreRequest:
    """`input_ids` is the whole sequence; tokens at positions >= `target_start` are scored (position 0 never is)."""

    input_ids: tuple[int, ...]
    target_start: int

    @property
    def n_targets(self) -> int:
        return max(0, len(self.input_ids) - max(1, self.target_start))


@dataclass(frozen=True)
class TokenScores:
    nll_sum: float
    n_tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.n_tokens if self.n_tokens else math.nan

    @property
    def finite(self) -> bool:
        return math.isfinite(self.nll_sum)


def length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped longest-first so each batch holds similar lengths (padded width x rows <= max_batch_tokens)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # longest-first: the first row sets the width
        too_many_tokens = max_batch_tokens is not None and current and width * (len(current) + 1) > max_batch_tokens
        if current and (len(current) >= batch_size or too_many_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


CPU_BATCH_TOKENS = 1024
"""Padded tokens per forward pass on CPU for a model as wide as SmolLM2-135M (hidden size 576). Measured there (2
cores, medians of 3 interleaved runs, tiled LM head): 1024 is 1.28x the one-by-one loop, 512 1.26x, 2048 1.19x,
4096 1.05x - bigger activations only spill the caches, and a CPU has no launch overhead to amortise."""
CPU_BATCH_WIDTH = 576
CPU_MAX_BATCH_TOKENS = 8192
"""A narrower model gets proportionally more tokens per pass (the same activation footprint), up to this: the tiny
test model (hidden 64) took less time with 8192 tokens per pass than with 1024 in 8 of 10 paired runs (up to 23 %
less; `bench/likelihood_bench.py --max-batch-tokens 1024 4096 8192`), and with 4096 in 5 of 5."""
CUDA_BATCH_TOKENS = 16384


def batch_token_budget(device, requested: int | Literal["auto"] | None, hidden_size: int | None = None) -> int | None:
    """`requested`, or for "auto" the measured sweet spot of the device type (None = no cap); on CPU scaled to the
    model's `hidden_size` (narrower: more tokens per pass, never fewer than `CPU_BATCH_TOKENS`)."""
    if requested != "auto":
        return requested
    if str(device).startswith("cuda"):
        return CUDA_BATCH_TOKENS
    if not hidden_size:
        return CPU_BATCH_TOKENS
    return min(CPU_MAX_BATCH_TOKENS, max(CPU_BATCH_TOKENS, CPU_BATCH_TOKENS * CPU_BATCH_WIDTH // hidden_size))


@dataclass(frozen=True)
class HeadTransform:
    """What a model's forward does to the LM head's logits before the softmax: Granite divides them by
    `logits_scaling`, Cohere multiplies them by `logit_scale` (HyperCLOVA X multiplies by its `logits_scaling`:
    the same name, the opposite operation), Gemma 2/3 soft-cap them with tanh."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits):
        import torch

        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def head_transform(config) -> HeadTransform:
    """The logit transform of the model family `config` belongs to (by model_type: attribute names are ambiguous)."""
    model_type = str(getattr(config, "model_type", ""))
    scale = 1.0
    if model_type.startswith("granite"):
        scale = 1.0 / float(config.logits_scaling)
    elif model_type.startswith("cohere"):
        scale = float(config.logit_scale)
    elif model_type.startswith("hyperclovax"):
        scale = float(config.logits_scaling)
    return HeadTransform(scale, getattr(config, "final_logit_softcapping", None))


class HeadSplit(NamedTuple):
    body: object
    head: object
    transform: HeadTransform


_SPLIT_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its checked split


def split_head(model) -> HeadSplit:
    """(transformer body, LM head, logit transform) of a *ForCausalLM, so the head can run on target positions only.

    The first call for a model checks the split against the model's own forward on a short sequence: a model whose
    forward changes the logits in a way `head_transform` does not know (a new family's scaling, a hidden-state
    multiplier before the head) raises here instead of scoring every sample wrong.
    """
    import torch

    known = _SPLIT_CHECKED.get(model)
    if known is not None:
        return known
    name = type(model).__name__
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or head is None or body is model:
        raise ScoringError(f"{name}: cannot split the transformer body from its LM head")
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ScoringError(f"{name}: the LM head has no [vocabulary x hidden] weight to tile")
    transform = head_transform(model.config)
    ids = torch.arange(1, 9, device=weight.device).remainder(weight.shape[0]).unsqueeze(0)
    with torch.inference_mode():
        full = model(input_ids=ids).logits[0].float()
        ours = transform(torch.nn.functional.linear(body(input_ids=ids).last_hidden_state[0], weight,
                                                    getattr(head, "bias", None)).float())
    if not bool(torch.isfinite(full).all()):  # broken weights: nothing to compare; scoring reports the NaN/inf
        return HeadSplit(body, head, transform)
    # same products in the same dtype: the paths agree to rounding unless the forward does something else
    tolerance = (1e-4 if weight.dtype == torch.float32 else 2e-2) * (1.0 + float(full.abs().max()))
    gap = float((full - ours).abs().max())
    if not gap <= tolerance:
        raise ScoringError(f"{name} (model_type {getattr(model.config, 'model_type', '?')!r}): its forward changes "
                           f"the LM head's logits in a way the tiled head does not reproduce (largest difference "
                           f"{gap:.3g} on a probe sequence)")
    split = HeadSplit(body, head, transform)
    _SPLIT_CHECKED[model] = split
    return split


HEAD_TILES = {"cpu": (1024, 2048), "cuda": (2048, None)}
"""Rows x vocabulary columns of LM-head logits computed at once (None = the whole vocabulary). On CPU a
full-vocabulary block (2048 rows x 49,152 columns = 400 MB for SmolLM2) leaves every cache: its product ran at
~70 % of the square-matmul rate and its log-softmax was memory-bound; 1024 x 2048 tiles (8 MB) run at 90-95 %.
A GPU keeps the earlier row chunks over the whole vocabulary (not yet measured there)."""


def default_head_tile(device) -> tuple[int, int | None]:
    return HEAD_TILES["cuda" if str(device).startswith("cuda") else "cpu"]


def head_nll(head, hidden, labels, transform: HeadTransform | None = None,
             tile: tuple[int, int | None] | None = None):
    """NLL of `labels` under the LM head applied to `hidden` (one row per label), as logsumexp(logits) minus the
    label's logit, with the logits (after the model's `transform`) computed in [rows x columns] tiles (`tile`,
    default `default_head_tile`) and the logsumexp combined across column tiles, so no full [rows x vocabulary]
    matrix is ever held."""
    import torch

    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ScoringError(f"{type(head).__name__}: the LM head has no [vocabulary x hidden] weight to tile")
    bias = getattr(head, "bias", None)
    transform = transform or HeadTransform()
    rows, cols = tile or default_head_tile(hidden.device)
    vocab = weight.shape[0]
    cols = cols or vocab
    nll = torch.empty(len(labels), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(labels), rows):
        part, wanted = hidden[start:start + rows], labels[start:start + rows]
        lse = target = None
        for first in range(0, vocab, cols):
            last = min(first + cols, vocab)
            logits = torch.nn.functional.linear(part, weight[first:last],
                                                None if bias is None else bias[first:last]).float()
            logits = transform(logits)
            # the label's logit comes from the same product as the normaliser (gather + where: no device sync)
            here = (wanted >= first) & (wanted < last)
            picked = logits.gather(1, (wanted - first).clamp(0, last - first - 1).unsqueeze(1)).squeeze(1)
            target = picked if target is None else torch.where(here, picked, target)
            tile_lse = torch.logsumexp(logits, dim=-1)
            lse = tile_lse if lse is None else torch.logaddexp(lse, tile_lse)
        nll[start:start + rows] = lse - target
    return nll


def _check_requests(requests: Sequence[ScoreRequest]) -> None:
    for i, r in enumerate(requests):
        if r.n_targets <= 0:
            raise ScoringError(f"request {i}: no target tokens (length {len(r.input_ids)}, target_start "
                               f"{r.target_start}); templates must skip such samples before scoring")


def score_requests(model, requests: Sequence[ScoreRequest], batch_size: int = 8, pad_id: int = 0,
                   progress: bool = False, max_batch_tokens: int | Literal["auto"] | None = "auto",
                   head_on_targets_only: bool = True, head_tile: tuple[int, int | None] | None = None,
                   nonfinite: Literal["raise", "return"] = "raise") -> list[TokenScores]:
    """Sum of NLL and count of scored tokens for every request, in request order.

    `max_batch_tokens` caps padded tokens per forward pass (on top of `batch_size` rows; "auto" = the device's
    measured sweet spot, see `batch_token_budget`; None = no cap). `nonfinite="return"`
    hands back a NaN/inf `nll_sum` for the caller to report (never to use as a score); "raise" stops.
    """
    import torch

    _check_requests(requests)
    device = next(model.parameters()).device
    split = None
    if head_on_targets_only:
        try:
            split = split_head(model)
        except ScoringError as err:  # correct numbers the slow way, said out loud
            warnings.warn(f"{err}; scoring with the model's full logits instead (same numbers, slower)", stacklevel=2)
    results: list[TokenScores | None] = [None] * len(requests)
    max_batch_tokens = batch_token_budget(device, max_batch_tokens, getattr(model.config, "hidden_size", None))
    batches = length_batches([len(r.input_ids) for r in requests], batch_size, max_batch_tokens)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(r.input_ids) for r in requests), desc="score", unit="tok", unit_scale=True)
    with torch.inference_mode():
        for idx in batches:
            lengths = [len(requests[i].input_ids) for i in idx]
            width = max(lengths)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            target = torch.zeros((len(idx), width), dtype=torch.bool)
            for row, i in enumerate(idx):
                ids[row, :lengths[row]] = torch.tensor(requests[i].input_ids, dtype=torch.long)
                target[row, max(1, requests[i].target_start):lengths[row]] = True
            ids = ids.to(device)
            # No attention mask: pads sit after every real token (right padding), so the causal mask alone keeps
            # them out of every real token's view, and attention keeps its fused causal kernel (an explicit mask
            # makes it fall back to materialising B x H x L x L scores). Pad positions are never read.
            mask = None
            # One row of positions, broadcast over the batch: rotary tables are computed once, not per row.
            positions = torch.arange(width, device=device).unsqueeze(0)
            # position p predicts token p + 1
            rows, cols = target[:, 1:].nonzero(as_tuple=True)
            rows, cols = rows.to(device), cols.to(device)
            labels = ids[rows, cols + 1]
            if split is not None:
                hidden = split.body(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
                picked = hidden[rows, cols]
                del hidden
                nll = head_nll(split.head, picked, labels, split.transform, head_tile)
            else:
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[rows, cols].float()
                nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
            sums = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, rows, nll.double())
            counts = torch.bincount(rows, minlength=len(idx))
            for row, i in enumerate(idx):
                value = float(sums[row])
                if not math.isfinite(value) and nonfinite == "raise":
                    raise ScoringError(f"request {i}: the model produced a non-finite loss ({value})")
                results[i] = TokenScores(value, int(counts[row]))
            if bar is not None:
                bar.update(sum(lengths))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def reference_scores(model, requests: Sequence[ScoreRequest], progress: bool = False) -> list[TokenScores]:
    """The reference implementations' loop: one sample per forward pass, labels -100 before the target, HF's loss.

    Kept as the yardstick for tests and `bench/likelihood_bench.py`; do not use it to score data.
    """
    import torch

    out = []
    with torch.inference_mode():
        for r, ids, labels in _one_by_one(model, requests, progress, "score (one by one)"):
            loss = float(model(ids, labels=labels).loss)
            out.append(TokenScores(loss * r.n_targets, r.n_targets))
    return out


def _one_by_one(model, requests: Sequence[ScoreRequest], progress: bool, desc: str):
    """(request, input ids, labels -100 before the target) of each request in turn, as the reference loops feed
    the model: a batch of one, on the model's device."""
    import torch

    _check_requests(requests)
    device = next(model.parameters()).device
    items = requests
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(requests, desc=desc)
    for r in items:
        ids = torch.tensor([r.input_ids], dtype=torch.long, device=device)
        labels = ids.clone()
        labels[0, :r.target_start] = -100
        yield r, ids, labels


def cherry_token_loop_scores(model, requests: Sequence[ScoreRequest], progress: bool = False) -> list[TokenScores]:
    """What Cherry's `data_analysis.py` (mode `cherry`) does per sequence, kept as the benchmark's second yardstick.

    One forward pass per sequence with every hidden state returned (the authors load the model with
    `output_hidden_states=True`), then a Python loop over every position: log-softmax of that position's logits,
    NLL of the next token, `.item()` into a list (`token_loss`, which `data_by_IFD.py` slices to the answer span and
    averages). The plain loop above (`reference_scores`) leaves that per-token loop out, so it is the stricter
    yardstick; this one is what the authors' scoring run costs. Do not use it to score data.
    """
    import torch

    out = []
    # as the authors run it: loss modules, `no_grad` (not `inference_mode`), one token tensor per position
    log_softmax, nll_loss = torch.nn.LogSoftmax(dim=-1), torch.nn.NLLLoss(reduction="none")
    with torch.no_grad():
        for r, ids, labels in _one_by_one(model, requests, progress, "score (Cherry's per-token loop)"):
            logits = model(ids, labels=labels, output_hidden_states=True).logits
            token_losses = []
            for i in range(1, ids.shape[1]):
                log_probs = log_softmax(logits[0, i - 1])
                token_losses.append(nll_loss(log_probs.unsqueeze(0), ids[0, i].unsqueeze(0)).item())
            span = token_losses[max(1, r.target_start) - 1:]  # the list's entry j is the loss of token j + 1
            out.append(TokenScores(math.fsum(span), len(span)))
    return out
