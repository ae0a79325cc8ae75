"""How well a candidate response fits a target model: log-likelihood of the response given its instruction.

GRAPE scores K candidate responses per instruction under the target model. All K share the same prompt (the
instruction under the target's chat template), so the prompt can be run once and its key/value cache reused for
every candidate (`fit_with_prefix_reuse`) instead of K full passes (`fit_plain`, built on `models.likelihood`).
Both return the same numbers (the test suite checks it); `bench/grape_prefix_bench.py` measures the difference.

Token layout of one candidate, under the target's chat template:
    prompt   = template(instruction messages, add_generation_prompt=True)
    response = the response's tokens as the whole conversation tokenizes (what the model sees when trained on it)
    tail     = what the template appends after the response, trailing whitespace removed (the end-of-turn
               marker, e.g. `<|im_end|>`)
The response is cut out of the tokenized conversation, not tokenized on its own: a SentencePiece tokenizer gives a
text on its own a leading word-start piece that it does not get after the template's newline. The prompt's tokens
must be a prefix of the conversation's (shared by all candidates) and the tail's a suffix; a candidate whose first
or last token merges across those boundaries is rejected with that reason, never scored on other tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from configs.errors import ConfigError, RecordError, ScoringError
from models.likelihood import ScoreRequest, TokenScores, head_nll, score_requests, split_head


@dataclass(frozen=True)
class CandidateTokens:
    """One candidate under the target's chat template (see the module docstring for the layout)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    tail_ids: tuple[int, ...]
    response_bytes: int

    def target_ids(self, score_end_of_turn: bool) -> tuple[int, ...]:
        """The tokens whose log-probability is the fit: the response, plus the end-of-turn marker if asked."""
        return self.response_ids + (self.tail_ids if score_end_of_turn else ())


@dataclass(frozen=True)
class CandidateGroup:
    """The candidates of one instruction: one shared prompt, K target token sequences."""

    prompt_ids: tuple[int, ...]
    targets: tuple[tuple[int, ...], ...]


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The instruction messages under the chat template, ending with the assistant's generation prompt."""
    if not tokenizer.chat_template:
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                          "GRAPE scores responses under the target's chat template")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def candidate_tokens(tokenizer, messages: list[dict[str, str]], responses: Sequence[str],
                     instruction_id: str = "?") -> list[CandidateTokens]:
    """Tokenize K responses to one instruction under the target's chat template.

    Raises RecordError when the template does not render a response verbatim right after the generation prompt
    (e.g. it trims whitespace), because then the response tokens cannot be told apart from the template's.
    """
    from jinja2 import TemplateError

    try:
        prompt_text = render_prompt(tokenizer, messages)
        fulls = [tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                               tokenize=False) for response in responses]
    except TemplateError as exc:  # e.g. Gemma's template on a ShareGPT system turn: a reject, not a traceback
        raise RecordError("candidates", f"instruction {instruction_id}", None,
                          f"template refused: the chat template refuses this conversation (roles "
                          f"{[m.get('role') for m in messages]}): {exc}", messages) from None
    prompt_ids = tuple(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    out: list[CandidateTokens] = []
    for k, (response, full) in enumerate(zip(responses, fulls)):
        if not full.startswith(prompt_text):
            raise ConfigError("the chat template renders an answered conversation with a different prefix than its "
                              f"generation prompt (instruction {instruction_id}); cannot separate prompt from response")
        suffix = full[len(prompt_text):]
        if not suffix.startswith(response):
            raise RecordError("candidates", f"instruction {instruction_id}", f"candidate {k}",
                              "the chat template does not render this response verbatim (it changes leading or "
                              "trailing whitespace?), so its tokens cannot be scored exactly", response)
        # The end-of-turn marker, without the template's trailing newline (a free token that would only dilute
        # the mean).
        tail = suffix[len(response):].rstrip()
        tail_ids = tuple(tokenizer(tail, add_special_tokens=False)["input_ids"]) if tail else ()
        ids = tuple(tokenizer(prompt_text + response + tail, add_special_tokens=False)["input_ids"])
        end = len(ids) - len(tail_ids)
        if ids[:len(prompt_ids)] != prompt_ids or ids[end:] != tail_ids or end <= len(prompt_ids):
            raise RecordError("candidates", f"instruction {instruction_id}", f"candidate {k}",
                              "its first or last token merges with the chat template's text around it, so its "
                              "tokens cannot be told apart from the template's", response)
        out.append(CandidateTokens(prompt_ids, ids[len(prompt_ids):end], tail_ids, len(response.encode("utf-8"))))
    return out


# ----------------------------------------------------------------------------------------------- plain passes
def fit_plain(model, groups: Sequence[CandidateGroup], batch_size: int = 8, pad_id: int = 0,
              progress: bool = False) -> list[list[TokenScores]]:
    """One full forward pass per candidate (prompt + response), through the shared likelihood engine."""
    requests = [ScoreRequest(g.prompt_ids + t, len(g.prompt_ids)) for g in groups for t in g.targets]
    flat = score_requests(model, requests, batch_size=batch_size, pad_id=pad_id, progress=progress)
    out, i = [], 0
    for g in groups:
        out.append(flat[i:i + len(g.targets)])
        i += len(g.targets)
    return out


# ------------------------------------------------------------------------------------------- prefix reuse
def fit_with_prefix_reuse(model, groups: Sequence[CandidateGroup], batch_size: int = 8, pad_id: int = 0,
                          progress: bool = False,
                          head_tile: tuple[int, int | None] | None = None) -> list[list[TokenScores]]:
    """Run each shared prompt once, keep its key/value cache, and score all its candidates from that cache.

    Prompts of several instructions go into one batch (right-padded); then candidate continuations are scored in
    batches of `batch_size` against copies of their own prompt's cache rows. Padding inside the prompt block is
    masked out and explicit position ids keep every continuation at its true positions, so the numbers equal
    `fit_plain` up to floating-point summation order. As in the likelihood engine, the LM head runs only on the
    positions that predict a target token (each prompt's last position and the continuations).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    for n, g in enumerate(groups):
        if not g.prompt_ids:
            raise ScoringError(f"group {n}: empty prompt; prefix reuse needs at least one prompt token")
        if any(not t for t in g.targets):
            raise ScoringError(f"group {n}: a candidate has no target tokens")
    device = next(model.parameters()).device
    body, head, transform = split_head(model)
    results: list[list[TokenScores | None]] = [[None] * len(g.targets) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: (-len(groups[i].prompt_ids), i))
    chunks: list[list[int]] = []
    for gi in order:  # groups per chunk: as many as fit `batch_size` candidates (at least one)
        if chunks and sum(len(groups[j].targets) for j in chunks[-1]) + len(groups[gi].targets) <= batch_size:
            chunks[-1].append(gi)
        else:
            chunks.append([gi])
    bar = tqdm(total=sum(len(g.targets) for g in groups), desc="fit (prefix reuse)", unit="cand", disable=not progress)
    with torch.inference_mode():
        for chunk in chunks:
            width = max(len(groups[g].prompt_ids) for g in chunk)
            prompt = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            prompt_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            lengths = torch.tensor([len(groups[g].prompt_ids) for g in chunk])
            for row, g in enumerate(chunk):
                prompt[row, :lengths[row]] = torch.tensor(groups[g].prompt_ids)
                prompt_mask[row, :lengths[row]] = 1
            prompt_mask = prompt_mask.to(device)
            out = body(input_ids=prompt.to(device), attention_mask=prompt_mask, use_cache=True)
            # each prompt's last hidden state predicts every one of its candidates' first target token
            last_hidden = out.last_hidden_state[torch.arange(len(chunk), device=device), lengths.to(device) - 1]
            layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            del out
            cands = [(row, g, k) for row, g in enumerate(chunk) for k in range(len(groups[g].targets))]
            for start in range(0, len(cands), batch_size):
                part = cands[start:start + batch_size]
                rows = torch.tensor([row for row, _, _ in part], device=device)
                targets = [groups[g].targets[k] for _, g, k in part]
                span = max(len(t) for t in targets)
                ids = torch.full((len(part), span), pad_id, dtype=torch.long)
                mask = torch.zeros((len(part), span), dtype=torch.long)
                for i, t in enumerate(targets):
                    ids[i, :len(t)] = torch.tensor(t)
                    mask[i, :len(t)] = 1
                ids, mask = ids.to(device), mask.to(device)
                cache = DynamicCache(ddp_cache_data=[(k.index_select(0, rows), v.index_select(0, rows))
                                                     for k, v in layers], config=model.config)
                positions = lengths.to(device)[rows].unsqueeze(1) + torch.arange(span, device=device).unsqueeze(0)
                hidden = body(input_ids=ids, attention_mask=torch.cat([prompt_mask[rows], mask], dim=1),
                              position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
                del cache
                # the state predicting target j: the prompt's last for j = 0, the continuation's j - 1 after
                predicting = torch.cat([last_hidden[rows].unsqueeze(1), hidden[:, :-1]], dim=1)
                where = mask.bool()
                picked, labels = predicting[where], ids[where]
                owner = where.nonzero(as_tuple=True)[0]
                nll = head_nll(head, picked, labels, transform, head_tile)
                sums = torch.zeros(len(part), dtype=torch.float64, device=device).index_add_(0, owner, nll.double())
                for i, (_, g, k) in enumerate(part):
                    value = float(sums[i])
                    if not math.isfinite(value):
                        raise ScoringError(f"group {g}, candidate {k}: the model produced a non-finite loss ({value})")
                    results[g][k] = TokenScores(value, len(targets[i]))
                bar.update(len(part))
    bar.close()
    return results  # type: ignore[return-value]


def score_fit(model, groups: Sequence[CandidateGroup], prefix_reuse: bool = True, batch_size: int = 8,
              pad_id: int = 0, progress: bool = False) -> list[list[TokenScores]]:
    """NLL sums and token counts for every candidate of every group, by either strategy."""
    fn = fit_with_prefix_reuse if prefix_reuse else fit_plain
    return fn(model, groups, batch_size=batch_size, pad_id=pad_id, progress=progress)
