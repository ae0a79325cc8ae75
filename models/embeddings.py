"""Sentence embeddings from a causal LM's final hidden states, batched, L2-normalised.

Two poolings, one per method that needs them:
- "last": the final hidden state of the last non-pad token (Deita's embedder).
- "mean": the mean of the final hidden states over the non-pad tokens (Cherry's pre-experience clustering).

Texts are tokenised one by one and right-padded here, so the pooling never depends on the tokenizer's
`padding_side`. Only the base model runs (no LM head): the vocabulary projection is the largest activation and
embeddings never need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from configs.errors import ScoringError

Pooling = Literal["last", "mean"]


def right_padded(sequences: Sequence[Sequence[int]], pad_id: int):
    """(ids, attention mask) as [rows x longest] long tensors, each row's tokens first, then padding."""
    import torch

    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, :len(seq)] = 1
    return ids, mask


def _base_model(model):
    """The transformer under a *ForCausalLM head (or the model itself when it has no head)."""
    base = getattr(model, "base_model", None)
    return base if base is not None else model


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0  # pad positions are masked out of attention and pooling, so the id itself never matters


def pool_hidden(hidden, attention_mask, pooling: Pooling):
    """[batch, seq, hidden] + right-padded mask [batch, seq] -> [batch, hidden] float32."""
    import torch

    hidden = hidden.float()
    mask = attention_mask.to(hidden.device)
    if pooling == "last":
        last = mask.sum(dim=1) - 1  # right padding: the last real token sits at length - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1)
    raise ValueError(f"unknown pooling {pooling!r}: expected 'last' or 'mean'")


def embed_texts(model, tokenizer, texts: Sequence[str], pooling: Pooling = "last", batch_size: int = 8,
                normalize: bool = True, progress: bool = False, max_length: int | None = None,
                add_special_tokens: bool = True) -> np.ndarray:
    """Embeddings of `texts`, float32 [n, hidden], in input order.

    Texts are sorted by token length for batching (less padding), then restored to input order.
    `max_length` truncates from the right (keeping the start of each text); None keeps every token.
    `add_special_tokens=False` for text that already carries them (a rendered chat template: no second BOS).
    """
    import torch

    if pooling not in ("last", "mean"):
        raise ValueError(f"unknown pooling {pooling!r}: expected 'last' or 'mean'")
    base = _base_model(model)
    device = next(model.parameters()).device
    hidden_size = int(model.config.hidden_size)
    out = np.zeros((len(texts), hidden_size), dtype=np.float32)
    if not texts:
        return out
    encoded = [tokenizer(t, add_special_tokens=add_special_tokens, truncation=max_length is not None, max_length=max_length)["input_ids"]
               for t in texts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ScoringError(f"text {i} encodes to no tokens: nothing to embed")
    order = sorted(range(len(texts)), key=lambda i: -len(encoded[i]))
    pad_id = _pad_id(tokenizer)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"embed ({pooling})", unit="batch")
    for start in batches:
        idx = order[start:start + batch_size]
        ids, mask = right_padded([encoded[i] for i in idx], pad_id)
        with torch.no_grad():
            hidden = base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        pooled = pool_hidden(hidden, mask, pooling)
        if not torch.isfinite(pooled).all():
            bad = [idx[r] for r in torch.nonzero(~torch.isfinite(pooled).all(dim=1)).flatten().tolist()]
            raise ScoringError(f"texts {bad[:5]}: the model produced non-finite hidden states")
        if normalize:
            norms = pooled.norm(dim=1, keepdim=True)
            if (norms == 0).any():
                raise ScoringError("an embedding has zero norm: cannot L2-normalise it")
            pooled = pooled / norms
        out[idx] = pooled.cpu().numpy().astype(np.float32)
    return out
