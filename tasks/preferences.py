"""Preference pairs for DPO, read into TRL's conversational preference rows.

Two input shapes:
- ShareGPT DPO (LLaMA-Factory, e.g. `../shared/data/dpo_en_demo.json`): `conversations` (from/value turns ending
  with the user, after an optional top-level `system` prompt), `chosen` and `rejected` (one `{from: gpt, value}` each).
- GRAPE pairs (what the GRAPE selection writes, JSONL): `prompt` (role/content messages ending with the user),
  `chosen` and `rejected` (lists of assistant messages).

Both become `{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}`. A bad row
raises a RecordError naming file, record and field, or (`on_error="skip"`) is written to the rejects with its reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from configs.errors import RecordError
from tasks.data import ASSISTANT_ROLES, _conversation, _raw_rows, _text, sharegpt_messages

PairFormat = Literal["sharegpt", "grape"]


@dataclass
class PairsResult:
    rows: list[dict[str, list[dict[str, str]]]]
    rejects: list[dict] = field(default_factory=list)
    format: PairFormat | None = None

    @property
    def counts(self) -> dict[str, int]:
        return {"pairs_read": len(self.rows) + len(self.rejects), "pairs_kept": len(self.rows),
                "pairs_rejected": len(self.rejects)}


def detect_pair_format(row: dict, file: str, location: str) -> PairFormat:
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row:
        return "grape"
    raise RecordError(file, location, None, "unknown preference format: expected 'conversations' (ShareGPT DPO) or "
                                            f"'prompt' (GRAPE pairs) beside 'chosen'/'rejected', found {sorted(row)}", row)


def _prompt(messages: list[dict[str, str]], row: dict, key: str, file: str, location: str) -> list[dict[str, str]]:
    if messages[-1]["role"] != "user":
        raise RecordError(file, location, key, "the prompt must end with a user turn (the answer is in chosen/rejected)", row)
    return messages


def _sharegpt_answer(row: dict, key: str, file: str, location: str) -> list[dict[str, str]]:
    answer = row.get(key)
    if answer is None:
        raise RecordError(file, location, key, "missing field", row)
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if not isinstance(answer, dict):
        raise RecordError(file, location, key, f"wrong type: expected a {{from, value}} object, got {type(answer).__name__}", row)
    if answer.get("from") not in ASSISTANT_ROLES:  # the same names a conversation's assistant turns may carry
        raise RecordError(file, location, f"{key}.from",
                          f"expected an assistant role ({', '.join(ASSISTANT_ROLES)}), got {answer.get('from')!r}", row)
    return [{"role": "assistant", "content": _text(answer, "value", file, location, where=f"{key}.value")}]


def _grape_answer(row: dict, key: str, file: str, location: str) -> list[dict[str, str]]:
    answer = row.get(key)
    if answer is None:
        raise RecordError(file, location, key, "missing field", row)
    if isinstance(answer, dict):
        answer = [answer]
    if not isinstance(answer, list) or not answer:
        raise RecordError(file, location, key, "wrong type: expected a non-empty list of assistant messages", row)
    out = []
    for j, message in enumerate(answer):
        where = f"{key}[{j}]"
        if not isinstance(message, dict):
            raise RecordError(file, location, where, f"wrong type: expected an object, got {type(message).__name__}", row)
        if message.get("role") != "assistant":
            raise RecordError(file, location, f"{where}.role", f"expected 'assistant', got {message.get('role')!r}", row)
        out.append({"role": "assistant", "content": _text(message, "content", file, location, where=f"{where}.content")})
    return out


def preference_row(raw: Any, fmt: PairFormat, file: str, location: str) -> dict[str, list[dict[str, str]]]:
    """One input row as a TRL conversational preference row."""
    if not isinstance(raw, dict):
        raise RecordError(file, location, None, f"wrong type: expected a JSON object, got {type(raw).__name__}", raw)
    if fmt == "sharegpt":
        prompt = _prompt(sharegpt_messages(raw, file, location, require_response=False), raw, "conversations", file,
                         location)
        chosen = _sharegpt_answer(raw, "chosen", file, location)
        rejected = _sharegpt_answer(raw, "rejected", file, location)
    else:
        prompt = _prompt(_conversation(raw, "prompt", "role", "content", file, location, require_response=False), raw,
                         "prompt", file, location)
        chosen = _grape_answer(raw, "chosen", file, location)
        rejected = _grape_answer(raw, "rejected", file, location)
    if chosen == rejected:
        # A pair without a preference carries no signal and makes the DPO margin exactly zero.
        raise RecordError(file, location, "rejected", "chosen and rejected are identical", raw)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def read_preference_pairs(path: str | os.PathLike, fmt: PairFormat | Literal["auto"] = "auto",
                          on_error: Literal["raise", "skip"] = "raise") -> PairsResult:
    """Read a ShareGPT DPO JSON/JSONL or a GRAPE pairs JSONL file into conversational preference rows."""
    path = Path(path)
    if not path.exists():
        raise RecordError(str(path), "file", None, "no such file")
    result = PairsResult(rows=[])
    for location, raw in _raw_rows(path, on_error, result.rejects):
        try:
            if result.format is None:
                result.format = fmt if fmt != "auto" else detect_pair_format(raw if isinstance(raw, dict) else {},
                                                                             str(path), location)
            result.rows.append(preference_row(raw, result.format, str(path), location))
        except RecordError as err:
            if on_error == "raise":
                raise
            result.rejects.append(err.as_reject())
    return result
