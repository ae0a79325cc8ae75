"""Records in, records out: Alpaca, ShareGPT, OpenAI `messages`, parquet and saved HF datasets.

Every reader produces the same canonical `Record` (a conversation of role/content messages with a stable
content-hash id) and keeps the user's original row, so a selected subset is written back in the format it came in,
and as `messages` for TRL. Bad rows raise a `RecordError` naming file, line/record and field; with
`on_error="skip"` they are counted and written to a rejects file instead. Nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from configs.errors import RecordError
from tasks.store import atomic_write_text, file_digest, run_stage, stage_task

Format = Literal["alpaca", "sharegpt", "messages"]
OnError = Literal["raise", "skip"]
LeadingReply = Literal["reject", "drop"]

# ShareGPT's `chatgpt`, `bing` and `bard` turns are answers of those chat products (5 V3 conversations hold a bing or
# bard turn): assistant turns, as `gpt` is.
_ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
    "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
}
_SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}
ASSISTANT_ROLES = tuple(name for name, role in _ROLE_ALIASES.items() if role == "assistant")
"""Every role name read as an assistant turn (conversations, and a ShareGPT pair's `chosen` / `rejected`)."""


@dataclass
class Record:
    """One conversation. `messages` is the canonical form; `source` is the user's row as read."""

    id: str
    messages: list[dict[str, str]]
    source_format: Format
    source: dict[str, Any]
    location: str = ""

    # --- views the methods need -------------------------------------------------------------------------
    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def turns(self) -> list[tuple[str, str | None]]:
        """(user, assistant) pairs in order; the assistant side is None for an unanswered last instruction."""
        body = [m for m in self.messages if m["role"] != "system"]
        pairs: list[tuple[str, str | None]] = []
        for i in range(0, len(body), 2):
            reply = body[i + 1]["content"] if i + 1 < len(body) else None
            pairs.append((body[i]["content"], reply))
        return pairs

    def alpaca_fields(self) -> tuple[str, str, str]:
        """(instruction, input, output) of the first turn, as the Cherry/Superfiltering templates need them.

        Alpaca rows keep their own split of instruction and input; other formats put the whole user message in
        `instruction` and leave `input` empty.
        """
        if self.source_format == "alpaca":
            return self.source["instruction"], self.source.get("input") or "", self.source.get("output") or ""
        user, reply = self.turns()[0]
        return user, "", reply or ""

    @property
    def instruction(self) -> str:
        return self.turns()[0][0]

    @property
    def response(self) -> str | None:
        return self.turns()[-1][1]

    def with_response(self, response: str) -> "Record":
        """The same record with its last assistant reply replaced (or added); the id follows the content."""
        messages = [dict(m) for m in self.messages]
        if messages[-1]["role"] == "assistant":
            messages[-1]["content"] = response
        else:
            messages.append({"role": "assistant", "content": response})
        # The user's row with only that reply's text changed: their role names (`chatgpt`, `user`), turn keys and
        # fields stay as they wrote them, so the subset in their format is their data.
        source = json.loads(json.dumps(self.source))
        if self.source_format == "alpaca":
            source["output"] = response
        elif self.source_format == "sharegpt":
            _set_last_reply(source["conversations"], "from", "value", "gpt", response)
        else:
            _set_last_reply(source["messages"], "role", "content", "assistant", response)
        return Record(record_id(messages), messages, self.source_format, source, self.location)

    def to_json(self) -> dict:
        return {"id": self.id, "messages": self.messages, "source_format": self.source_format,
                "source": self.source, "location": self.location}

    @classmethod
    def from_json(cls, row: dict) -> "Record":
        return cls(row["id"], row["messages"], row["source_format"], row["source"], row.get("location", ""))


def _set_last_reply(turns: list[dict], role_key: str, text_key: str, default_role: str, response: str) -> None:
    """Set the text of the last turn of a user's row when it is an assistant turn, or append one: with the role
    name the row gives its other assistant turns, else the format's own (`gpt`, `assistant`)."""
    if _ROLE_ALIASES.get(turns[-1][role_key]) == "assistant":
        turns[-1][text_key] = response
        return
    names = [t[role_key] for t in turns if _ROLE_ALIASES.get(t[role_key]) == "assistant"]
    turns.append({role_key: names[-1] if names else default_role, text_key: response})


def record_id(messages: list[dict[str, str]]) -> str:
    """Stable content hash of a conversation: same roles and texts, same id, on every machine."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------- reading
@dataclass
class ReadResult:
    records: list[Record]
    rejects: list[dict] = field(default_factory=list)
    format: Format | None = None
    repairs: list[dict] = field(default_factory=list)  # records kept with a change (data.leading_reply: drop)

    @property
    def counts(self) -> dict[str, int]:
        out = {"records_read": len(self.records) + len(self.rejects), "records_kept": len(self.records),
               "records_rejected": len(self.rejects)}
        out.update(reject_counts(r["reason"] for r in self.rejects))
        if self.repairs:
            out["records_opening_reply_dropped"] = len(self.repairs)
        return out


def reject_kind(reason: str) -> str:
    """What a reject reason is counted as: its text before the first colon ("duplicate id", "special token in the
    text"); the details after it (ids, roles, tokens) would make a key per record."""
    return reason.split(":")[0]


def reject_counts(reasons: Iterable[str]) -> dict[str, int]:
    """`rejected[kind]` per kind of reject reason (`reject_kind`), in the order of the kinds."""
    return {f"rejected[{kind}]": n for kind, n in sorted(Counter(map(reject_kind, reasons)).items())}


def read_records(path: str | os.PathLike, fmt: Format | Literal["auto"] = "auto", on_error: OnError = "raise",
                 require_response: bool = True, leading_reply: LeadingReply = "reject") -> ReadResult:
    """Read a file (or saved HF dataset folder) into canonical records.

    `require_response=False` accepts instruction-only rows (input for response generation). `leading_reply="drop"`
    keeps a conversation that opens with a reply without that reply, listed in `repairs` (see `_conversation`).
    """
    path = Path(path)
    if not path.exists():
        raise RecordError(str(path), "file", None, "no such file or folder")
    result = ReadResult(records=[])
    seen: dict[str, str] = {}
    for location, raw in _raw_rows(path, on_error, result.rejects):
        try:
            if not isinstance(raw, dict):
                raise RecordError(str(path), location, None, f"wrong type: expected a JSON object, got {type(raw).__name__}", raw)
            bad = lone_surrogate(raw)
            if bad:  # no character: it cannot be hashed or written as UTF-8 (the read died on it, naming nothing)
                raise RecordError(str(path), location, bad[0] or None, f"invalid unicode: lone surrogate "
                                  f"U+{ord(bad[1]):04X} at character {bad[2]} (half of a UTF-16 pair, e.g. text cut "
                                  "inside an emoji)", raw)
            row_fmt = fmt if fmt != "auto" else (result.format or detect_format(raw, str(path), location))
            result.format = result.format or row_fmt
            repairs: list[dict] = []
            messages = _to_messages(raw, row_fmt, str(path), location, require_response, leading_reply, repairs)
            rid = record_id(messages)
            if rid in seen:
                raise RecordError(str(path), location, "id",
                                  f"duplicate id: {rid} is the same conversation as {seen[rid]}", raw)
            seen[rid] = location
            result.records.append(Record(rid, messages, row_fmt, raw, location))
            result.repairs += [{"file": str(path), "location": location, "id": rid, **r} for r in repairs]
        except RecordError as err:
            if on_error == "raise":
                raise
            result.rejects.append(err.as_reject())
    return result


def detect_format(row: dict, file: str = "", location: str = "") -> Format:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    raise RecordError(file, location, None,
                      f"unknown format: expected a 'messages', 'conversations' or 'instruction' field, found {sorted(row)}", row)


ACCEPTED_INPUTS = ("Alpaca, ShareGPT or OpenAI-messages records as a .json array or .jsonl lines, a .parquet file, "
                   "or a folder written by the datasets library's save_to_disk")


def _raw_rows(path: Path, on_error: OnError, rejects: list[dict]) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        yield from _hf_rows(path)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:  # ArrowInvalid: a truncated file, or not parquet at all
            raise RecordError(str(path), "file", None, f"not a readable parquet file ({exc}): give {ACCEPTED_INPUTS}") \
                from None
        for i, row in enumerate(table.to_pylist()):
            yield f"row {i}", row
    elif path.suffix == ".jsonl":
        yield from jsonl_rows(path, on_error, rejects)
    else:
        yield from json_rows(path)


def _hf_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:  # a folder without save_to_disk's state files (datasets' message names no fix)
        raise RecordError(str(path), "folder", None,
                          f"not a saved Hugging Face dataset (no dataset_info/state files): give {ACCEPTED_INPUTS}") \
            from None
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    for i, row in enumerate(ds):
        yield f"row {i}", row


def jsonl_rows(path: Path, on_error: OnError, rejects: list[dict]) -> Iterator[tuple[str, Any]]:
    """(`line N`, parsed row) of a JSONL file; a line that is not UTF-8 JSON raises or goes to `rejects`."""
    with open(path, "rb") as fh:
        for lineno, raw_line in enumerate(fh, start=1):
            if not raw_line.strip():
                continue
            try:
                try:
                    text = raw_line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise RecordError(str(path), f"line {lineno}", None,
                                      f"not UTF-8: byte {raw_line[exc.start]:#04x} at column {exc.start + 1}",
                                      raw_line.decode("utf-8", "replace")) from None
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise RecordError(str(path), f"line {lineno}", None, f"invalid JSON: {exc.msg} (column {exc.colno})",
                                      text.rstrip("\n")) from None
            except RecordError as err:
                if on_error == "raise":
                    raise
                rejects.append(err.as_reject())
                continue
            yield f"line {lineno}", row


def json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(`record N`, row) of a JSON array (or Cherry's {"data": [...]}); not UTF-8 or invalid JSON raises, naming
    the line, even with on_error=skip (nothing after the error can be read)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecordError(str(path), f"line {line}", None, f"not UTF-8: byte {data[exc.start]:#04x}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        # A broken JSON array cannot be read past the error, so this is fatal even with on_error=skip.
        ended = exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip())
        cut = " (the file ends inside it: cut off?)" if ended else ""
        raise RecordError(str(path), f"line {exc.lineno}", None,
                          f"invalid JSON: {exc.msg} (column {exc.colno}){cut}; a JSON array cannot be read past the "
                          "error, so no record of it was read, even with on_error=skip: repair the file, or give the "
                          "records as JSONL (one per line), where a bad line is skipped alone") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]  # {"Meta_Info":..., "data": [...]} files, as Cherry's logs are written
    if not isinstance(doc, list):
        raise RecordError(str(path), "top level", None, f"wrong type: expected a JSON array of records (or {{\"data\": [...]}}), got {type(doc).__name__}")
    for i, row in enumerate(doc):
        yield f"record {i}", row


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: object, path: str = "") -> tuple[str, str, int] | None:
    """(field path, the surrogate, its position) of the first string anywhere in `value` holding a lone UTF-16
    surrogate (JSON's "\\ud83d" without its pair: text cut inside an emoji), else None."""
    if isinstance(value, str):
        bad = _SURROGATE.search(value)
        return (path, bad.group(), bad.start()) if bad else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = lone_surrogate(key, path) if isinstance(key, str) else None
        found = found or lone_surrogate(item, f"{path}[{key}]" if isinstance(key, int) else
                                        f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def _text(row: dict, key: str, file: str, location: str, required: bool = True, where: str | None = None,
          record: dict | None = None) -> str:
    """`row[key]` as a string. `record` is the whole row when `row` is one turn of it: a reject carries the whole
    conversation, not just the turn that was wrong (the rejects file could not give back the rest)."""
    name = where or key
    raw = row if record is None else record
    value = row.get(key)
    if value is None:
        if required:
            raise RecordError(file, location, name, "missing field", raw)
        return ""
    if not isinstance(value, str):
        raise RecordError(file, location, name, f"wrong type: expected a string, got {type(value).__name__}", raw)
    if required and not value.strip():
        raise RecordError(file, location, name, "empty field", raw)
    return value


def with_instance_input(instruction: str, row: dict, file: str, location: str) -> str:
    """A Self-Instruct row's instruction, followed by the input of its one instance (`instances: [{input, output}]`)
    as Alpaca's instruction and input are joined; a malformed `instances` is an error naming it, never left out."""
    instances = row.get("instances")
    if instances is None:
        return instruction
    if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
        raise RecordError(file, location, "instances", "expected a list with exactly one {input, output} object", row)
    extra = instances[0].get("input")
    extra = "" if extra is None else extra
    if not isinstance(extra, str):
        raise RecordError(file, location, "instances[0].input",
                          f"wrong type: expected a string, got {type(extra).__name__}", row)
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _to_messages(row: dict, fmt: str, file: str, location: str, require_response: bool,
                 leading_reply: LeadingReply = "reject", repairs: list[dict] | None = None) -> list[dict[str, str]]:
    if fmt == "alpaca":
        instruction = _text(row, "instruction", file, location)
        extra = _text(row, "input", file, location, required=False)
        output = _text(row, "output", file, location, required=require_response)
        messages: list[dict[str, str]] = []
        system = _text(row, "system", file, location, required=False)
        if system:
            messages.append({"role": "system", "content": system})
        # None only: `or []` would pass a history of "", 0 or {} off as no earlier turns, dropping what was meant
        history = row.get("history")
        history = [] if history is None else history
        if not isinstance(history, list):
            raise RecordError(file, location, "history", "wrong type: expected a list of [instruction, response] "
                              f"pairs, got {type(history).__name__}", row)
        for j, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) and t.strip() for t in pair)):
                raise RecordError(file, location, f"history[{j}]", "expected a pair of non-empty strings", row)
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        messages.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction})
        if output:
            messages.append({"role": "assistant", "content": output})
        return messages
    if fmt == "sharegpt":
        return sharegpt_messages(row, file, location, require_response, leading_reply, repairs)
    if fmt == "messages":
        return _conversation(row, "messages", "role", "content", file, location, require_response, leading_reply,
                             repairs)
    raise RecordError(file, location, None, f"unknown format {fmt!r}")


def sharegpt_messages(row: dict, file: str, location: str, require_response: bool,
                      leading_reply: LeadingReply = "reject", repairs: list[dict] | None = None) -> list[dict[str, str]]:
    """The `conversations` turns as messages, led by the top-level `system` prompt when the row has one."""
    messages = _conversation(row, "conversations", "from", "value", file, location, require_response, leading_reply,
                             repairs)
    # ShareGPT keeps a system prompt either as a top-level "system" field or as a first "system" turn.
    system = _text(row, "system", file, location, required=False)
    if system:
        if messages[0]["role"] == "system":
            raise RecordError(file, location, "system", "a top-level system prompt and a system turn at "
                              "conversations[0] as well: keep one of them", row)
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _conversation(row: dict, key: str, role_key: str, text_key: str, file: str, location: str,
                  require_response: bool, leading_reply: LeadingReply = "reject",
                  repairs: list[dict] | None = None) -> list[dict[str, str]]:
    """The turns as messages. With `leading_reply="drop"` an opening assistant turn (after a system prompt) is
    left out and noted in `repairs`: ShareGPT cut long conversations into parts, and every later part opens with
    a reply to a question that is in the part before."""
    turns = row.get(key)
    if turns is None:
        raise RecordError(file, location, key, "missing field", row)
    if not isinstance(turns, list):
        raise RecordError(file, location, key, f"wrong type: expected a list of turns, got {type(turns).__name__}", row)
    if not turns:
        raise RecordError(file, location, key, "empty field: the list of turns is empty", row)
    messages = []
    for j, turn in enumerate(turns):
        where = f"{key}[{j}]"
        if not isinstance(turn, dict):
            raise RecordError(file, location, where, f"wrong type: expected an object, got {type(turn).__name__}", row)
        role_raw = turn.get(role_key)
        role = _ROLE_ALIASES.get(role_raw) if isinstance(role_raw, str) else None
        if role is None:
            # the role goes after the colon: the reject counts group by the text before it, one key for all roles
            raise RecordError(file, location, f"{where}.{role_key}",
                              f"unknown role: {role_raw!r} is none of {', '.join(_ROLE_ALIASES)}", row)
        content = _text(turn, text_key, file, location, where=f"{where}.{text_key}", record=row)
        messages.append({"role": role, "content": content})
    for j, message in enumerate(messages[1:], start=1):
        if message["role"] == "system":
            raise RecordError(file, location, f"{key}[{j}].{role_key}", "a system message may only come first", row)
    offset = 1 if messages[0]["role"] == "system" else 0
    dropped = 0  # turns left out before the body: message i of the body is turn offset + dropped + i of the row
    if leading_reply == "drop" and len(messages) > offset and messages[offset]["role"] == "assistant":
        reply = messages.pop(offset)
        dropped = 1
        if repairs is not None:
            repairs.append({"field": f"{key}[{offset}]", "repair": "opening reply dropped (data.leading_reply: drop)",
                            "dropped": reply})
    body = [m["role"] for m in messages[offset:]]
    if not body:
        raise RecordError(file, location, key, "no user turn: the conversation holds only a system prompt" +
                          (" and the opening reply that data.leading_reply: drop left out" if dropped else ""), row)
    for i, role in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            j = offset + dropped + i
            rule = ("a conversation starts with a user turn; ShareGPT's later parts of a split conversation open "
                    "with a reply: data.leading_reply: drop leaves that reply out and keeps the rest" if j == offset
                    else f"{key}[{j - 1}] is already a{'n' if role == 'assistant' else ''} {role} turn")
            # name the first turn out of place: a list of every role of a 100-turn conversation finds nothing
            raise RecordError(file, location, f"{key}[{j}].{role_key}",
                              f"roles must alternate user/assistant: {turns[j].get(role_key)!r} ({role}) where "
                              f"a{'n' if expected == 'assistant' else ''} {expected} turn belongs ({rule})", row)
    if require_response and body[-1] != "assistant":
        raise RecordError(file, location, f"{key}[{len(turns) - 1}]",
                          "no final assistant response: the conversation ends on a user turn", row)
    return messages


# --------------------------------------------------------------------------------------------------- writing
def _to_sharegpt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"from": _SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages]


def to_format(record: Record, fmt: Format | Literal["source"]) -> dict:
    """The record as a row of the given format; "source" is the user's own row, unchanged."""
    if fmt == "source":
        return record.source
    if fmt == "messages":
        return {"messages": record.messages}
    if fmt == "sharegpt":
        return {"conversations": _to_sharegpt(record.messages)}
    if fmt == "alpaca":
        instruction, extra, output = record.alpaca_fields()
        row = {"instruction": instruction, "input": extra, "output": output}
        if record.system:
            row["system"] = record.system
        if len(record.turns()) > 1:
            row["history"] = [list(t) for t in record.turns()[:-1]]
            row["instruction"], row["input"], row["output"] = record.turns()[-1][0], "", record.turns()[-1][1] or ""
        return row
    raise ValueError(f"unknown format {fmt!r}")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_records(records: Iterable[Record], path: str | os.PathLike, fmt: Format | Literal["source"] = "source") -> int:
    """Write records as JSONL (or a JSON array when the path ends in .json)."""
    rows = [to_format(r, fmt) for r in records]
    if str(path).endswith(".json"):
        atomic_write_text(path, json.dumps(rows, ensure_ascii=False, indent=1))
        return len(rows)
    return write_jsonl(path, rows)


def save_canonical(records: Iterable[Record], path: str | os.PathLike) -> int:
    return write_jsonl(path, (r.to_json() for r in records))


def load_canonical(path: str | os.PathLike) -> list[Record]:
    return [Record.from_json(row) for row in read_jsonl(path)]


# ------------------------------------------------------------------------------------------------ the stage
def require_records(result: ReadResult, path: str | os.PathLike, rejects_file: str | os.PathLike) -> None:
    """Refuse a pool with no usable record here, in the records stage: later stages would otherwise "succeed" with
    an empty subset, or fail with a message about their own internals (clusters, an empty training file)."""
    if result.records:
        return
    if not result.rejects:
        raise RecordError(str(path), "whole file", None,
                          "no records in it: give a file with at least one record (data.path)")
    counts = result.counts
    reasons = ", ".join(f"{k.removeprefix('rejected[').removesuffix(']')} {v}" for k, v in counts.items()
                        if k.startswith("rejected["))
    raise RecordError(str(path), "whole file", None,
                      f"all {counts['records_read']} records read were rejected ({reasons}), so none is left to "
                      f"use: fix them (each is listed with its line and reason in {rejects_file})")


def prepare_records(data, require_response: bool = True):
    """Stage `records`: read the user's file into canonical `records.jsonl` (+ `rejects.jsonl` with reasons)."""
    def body(folder: Path) -> dict:
        result = read_records(data.path, data.format, data.on_error, require_response, data.leading_reply)
        records = result.records[: data.limit] if data.limit else result.records
        write_jsonl(folder / "rejects.jsonl", result.rejects)
        write_jsonl(folder / "repairs.jsonl", result.repairs)
        require_records(result, data.path, folder / "rejects.jsonl")
        save_canonical(records, folder / "records.jsonl")
        counts = result.counts
        counts["records_used"] = len(records)
        summary = (f"Read **{counts['records_read']}** records ({result.format}) from `{data.path}`: "
                   f"{len(records)} used, {counts['records_rejected']} rejected (see rejects.jsonl).")
        if result.repairs:
            summary += (f" {len(result.repairs)} kept without their opening reply (data.leading_reply: drop; "
                        "see repairs.jsonl).")
        return {"metrics": counts, "params": {"source_format": result.format, "data_path": str(data.path),
                                              "leading_reply": data.leading_reply},
                "artifacts": ["rejects.jsonl", "repairs.jsonl"], "summary": summary}

    config = {"data": data, "source_digest": file_digest(data.path), "require_response": require_response}
    return run_stage("records", config, [], body, digest_of=["records.jsonl"])


prepare_records_task = stage_task(prepare_records, name="prepare-records")
