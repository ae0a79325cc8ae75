"""Texts that hold one of a tokenizer's special tokens as a string, found before they are tokenized.

A tokenizer reads the string "<|endoftext|>" (or "<|im_start|>", "</s>", ...) in a text as that control token, not
as the characters: a real ShareGPT V3 reply ending in "...Skipped 1 messages<|endoftext|>" would be trained on, and
scored, as a sequence with an end of text in the middle of a conversation. Training (`tasks/train.py`) and every
scoring stage (IFD `score` and `cherry-instructions`, `grape-fit`, the Deita scorers and `deita-embed`,
`eval-likelihood`, `select-superfilter-d`'s embedder, `eval-answers` and `eval-judge`), and the generators
(`models/generation.py`: finish_reason `special_token`; the HTTP backend when given the served model's tokenizer)
look at the user's own texts with these functions, never at what a template renders (a chat template writes
`<|im_start|>` itself), and leave such an item out: listed with the reason below, counted, warned about; where every
item is left out for it, the stage refuses with a ConfigError.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

from configs.errors import ConfigError

log = logging.getLogger(__name__)

SPECIAL_TOKEN = "special token in the text"
"""The reject kind: every reason starts with it, then a colon (the stages count rejects by that first part)."""


def special_token_strings(tokenizer) -> list[str]:
    """The texts of the tokenizer's special tokens (named ones and added special ones), longest first."""
    specials = {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special and t.content}
    return sorted(specials, key=lambda t: (-len(t), t))


def special_token_pattern(tokenizer) -> re.Pattern | None:
    """One regular expression for all the tokenizer's special tokens (None when it has none). Longest first, so
    at one position the longer token wins, as it does in the tokenizer."""
    tokens = special_token_strings(tokenizer)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def first_special_token(texts: Iterable[tuple[str, str]], pattern: re.Pattern | None) -> tuple[str, str] | None:
    """(where, token) of the first text of `texts` ((where, text) pairs, in order) that holds a special token:
    the token that comes first in it. None when none does."""
    if pattern is None:
        return None
    for where, text in texts:
        found = pattern.search(text) if isinstance(text, str) else None
        if found:
            return where, found.group(0)
    return None


def special_token_reason(token: str, where: str = "it") -> str:
    """The reject reason: `where` names the field or message that holds `token`."""
    return (f"{SPECIAL_TOKEN}: {where} holds {token!r}, which the tokenizer would read as that control token, "
            "not as text")


def message_texts(messages: Sequence[dict], roles: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """(where, text) of a conversation's messages ("the user message 1", "the assistant message 2", ...; numbered
    from 1 over all of them, a system message included), only those of `roles` when given."""
    wanted = None if roles is None else set(roles)
    return [(f"the {m['role']} message {i}", m["content"]) for i, m in enumerate(messages, 1)
            if wanted is None or m["role"] in wanted]


def special_tokens_in_text(rows: list[dict], tokenizer) -> dict[int, str]:
    """{row index: the special token} of the training rows whose own text holds one of the tokenizer's special
    tokens (every string field, and the `content` of each message of a list field). Chat templates render the
    text and the tokenizer then reads such a string as the control token itself: such rows are not trained on,
    and are listed."""
    pattern = special_token_pattern(tokenizer)
    found: dict[int, str] = {}
    for i, row in enumerate(rows):
        hit = first_special_token(((key, text) for key, value in row.items() for text in _row_texts(value)), pattern)
        if hit:
            found[i] = hit[1]
    return found


def _row_texts(value) -> list[str]:
    """The texts of one field of a training row: a string, or the `content` of each message in a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return []


def report_special_tokens(stage: str, reasons: Iterable[str], total: int, what: str, rejects_file) -> int:
    """Warn about the items of a stage (records, candidates) not scored for a special token's text (`reasons`: the
    reject reasons of its items, any kind); refuse the stage with a ConfigError when that is all `total` of them.
    Returns how many there are."""
    held = [r for r in reasons if r.startswith(SPECIAL_TOKEN + ":")]
    if not held:
        return 0
    if len(held) == total:
        raise ConfigError(
            f"{stage}: all {total} {what} hold one of the tokenizer's special tokens as text (first: "
            f"{held[0][len(SPECIAL_TOKEN) + 2:].split(',')[0]}), so none can be scored as written; each is listed in "
            f"{rejects_file}: remove those strings from the data, or score with a model whose tokenizer does not "
            "have these special tokens")
    log.warning("%s: %d of %d %s hold a special token's text and are not scored (listed in %s)", stage, len(held),
                total, what, rejects_file)
    return len(held)
