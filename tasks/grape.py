"""GRAPE: keep, per instruction, the candidate response the target model finds most probable; DPO pairs from fit.

Stages:
- `candidates` (bring your own): ingest a multi-response file into the candidates table of `tasks/generate.py`.
- `grape-fit`: log-likelihood of every candidate under the target model (`models/fit.py`), in resumable shards.
- `select-grape`: fit by the chosen criterion, the best per instruction, the SFT subset, optional DPO pairs,
  plots (winner counts, fit distribution, best-vs-second margin).

Choices the paper leaves open, made explicit (and logged as params):
- fit = log-prob of the response tokens (+ the end-of-turn marker, `score_end_of_turn`) given the instruction
  under the target's chat template; criteria `mean_logprob` (paper: length-normalised), `sum_logprob`,
  `per_byte` (total log-prob / UTF-8 bytes of the response, comparable across tokenizers);
- tie-break: higher fit, then generator name (ascending), then candidate index: independent of input order;
- DPO pair: chosen = best fit, rejected = worst fit, kept when their margin is > 0 and >= `min_margin` and the
  texts differ (a tie says nothing about preference).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from configs.errors import ConfigError, RecordError, ScoringError
from configs.grape import CandidatesFile, Criterion, GrapeSelection
from models.generation import CONTEXT_OVERFLOW, SERVER_REFUSED, TEMPLATE_REFUSED
from models.generation import SPECIAL_TOKEN as SPECIAL_TOKEN_FINISH
from models.special_tokens import (SPECIAL_TOKEN, first_special_token, message_texts, report_special_tokens,
                                   special_token_pattern, special_token_reason)
from tasks.data import (Record, json_rows, jsonl_rows, load_canonical, read_jsonl, record_id, reject_counts,
                        reject_kind, with_instance_input, write_jsonl)
from tasks.generate import CANDIDATE_FILES, instruction_messages, read_parquet, write_candidates, write_parquet
from tasks.select import SUBSET_FILES, write_subset
from tasks.store import ShardedTable, StageOutput, file_digest, run_stage, stage_task

# The prompt field of each instruction test set (vicuna, koala, lima, sinstruct/UltraFeedback, wizardlm).
PROMPT_FIELDS = ("text", "prompt", "conversations", "instruction", "Instruction")
_ANSWER = re.compile(r"^Answer(\d+)$")


# ------------------------------------------------------------------------------------------------ ingestion
def _prompt(row: dict, file: str, location: str) -> str:
    present = [k for k in PROMPT_FIELDS if k in row]
    if len(present) != 1:
        what = "no prompt field" if not present else f"several prompt fields {present}"
        raise RecordError(file, location, None, f"{what}: expected exactly one of {list(PROMPT_FIELDS)}", row)
    key = present[0]
    text = row[key]
    if not isinstance(text, str):
        raise RecordError(file, location, key, f"wrong type: expected a string, got {type(text).__name__}", row)
    if not text.strip():
        raise RecordError(file, location, key, "empty field", row)
    # Self-Instruct: the input lives in instances[0]
    return with_instance_input(text, row, file, location) if key == "instruction" else text


_ABSENT = object()
"""The response of an AnswerN field that other rows of the file hold and this row lacks."""


def _answer_keys(keys: Iterable[str]) -> list[str]:
    return sorted((k for k in keys if _ANSWER.match(k)), key=lambda k: int(_ANSWER.match(k).group(1)))


def _row_candidates(row: dict, fmt: str, file: str, location: str,
                    file_answers: Iterable[str] = ()) -> list[tuple[str, object, str]]:
    """(generator name as the file has it, raw response or _ABSENT, field name) in file order; `file_answers`:
    the AnswerN fields of every row of the file, so one that this row lacks is a reject, as a null answer is."""
    if fmt == "answers":
        if not _answer_keys(row):
            raise RecordError(file, location, None, "no Answer1, Answer2, ... fields", row)
        return [(k, row.get(k, _ABSENT), k) for k in _answer_keys(set(row) | set(file_answers))]
    completions = row.get("completions")
    if not isinstance(completions, list) or not completions:
        raise RecordError(file, location, "completions", "expected a non-empty list of {model, response}", row)
    out = []
    for j, item in enumerate(completions):
        if not isinstance(item, dict):
            raise RecordError(file, location, f"completions[{j}]", "wrong type: expected an object", row)
        model = item.get("model")
        if model is not None and not isinstance(model, str):
            # named by position instead, it would pass as another generator (or clash with `completion{j}`)
            raise RecordError(file, location, f"completions[{j}].model",
                              f"wrong type: expected a generator name (a string), got {type(model).__name__}", row)
        model = model or f"completion{j}"  # no name: by position
        out.append((model, item.get("response"), f"completions[{j}].response"))
    return out


def _detect(row: dict, file: str, location: str) -> str:
    if "completions" in row:
        return "completions"
    if any(_ANSWER.match(k) for k in row):
        return "answers"
    raise RecordError(file, location, None, "unknown candidates format: expected AnswerN fields or a 'completions' "
                                            f"list, found {sorted(row)}", row)


def _candidate_rows(path: Path, on_error: str, rejects: list[dict]) -> list[tuple[str, object]]:
    # read as data files are: a broken JSONL line is a reject (or the error) naming its line; a JSON file that is
    # not UTF-8 or not JSON is an error naming its line
    if path.suffix == ".jsonl":
        return list(jsonl_rows(path, on_error, rejects))
    return list(json_rows(path))


def read_candidates_file(cfg: CandidatesFile) -> tuple[list[Record], list[dict], list[dict]]:
    """(instructions, candidate rows, rejects) from a multi-response file; see CandidatesFile for the formats."""
    path = Path(cfg.path)
    if not path.exists():
        raise RecordError(str(path), "file", None, "no such file")
    instructions: list[Record] = []
    rows: list[dict] = []
    rejects: list[dict] = []
    seen: dict[str, str] = {}
    fmt = None if cfg.format == "auto" else cfg.format

    def reject(err: RecordError) -> None:
        if cfg.on_error == "raise":
            raise err
        rejects.append(err.as_reject())

    params = json.dumps({"backend": "file", "source": str(path)})
    generators: set[str] = set()  # as the file names them, to check generator_labels against
    read = _candidate_rows(path, cfg.on_error, rejects)
    file_answers = _answer_keys({k for _, raw in read if isinstance(raw, dict) for k in raw})
    for location, raw in read:
        if cfg.limit is not None and len(instructions) >= cfg.limit:
            break
        try:
            if not isinstance(raw, dict):
                raise RecordError(str(path), location, None, f"wrong type: expected an object, got {type(raw).__name__}", raw)
            fmt = fmt or _detect(raw, str(path), location)
            messages = [{"role": "user", "content": _prompt(raw, str(path), location)}]
            iid = record_id(messages)
            if iid in seen:
                raise RecordError(str(path), location, None, f"duplicate instruction: same prompt as {seen[iid]}", raw)
            kept = []
            for name, response, field in _row_candidates(raw, fmt, str(path), location, file_answers):
                generators.add(name)
                label = cfg.generator_labels.get(name, name)
                if response is _ABSENT:
                    reject(RecordError(str(path), location, field, f"missing field: other rows of the file hold "
                                       f"{field}; give it, or null for no answer", raw))
                    continue
                if not isinstance(response, str) or not response.strip():
                    why = "empty response" if isinstance(response, str) or response is None else \
                        f"wrong type: expected a string, got {type(response).__name__}"
                    reject(RecordError(str(path), location, field, why, raw))
                    continue
                kept.append((label, response))
            labels_here = [label for label, _ in kept]
            if len(set(labels_here)) != len(labels_here):
                raise RecordError(str(path), location, None, f"the same generator answers twice: {labels_here}", raw)
            if not kept:
                raise RecordError(str(path), location, None, "no usable candidate response", raw)
        except RecordError as err:
            reject(err)
            continue
        seen[iid] = location
        instructions.append(Record(iid, messages, "messages", {"messages": messages}, location))
        for index, (label, response) in enumerate(kept):
            rows.append({"instruction_id": iid, "candidate_index": index, "generator": label, "response": response,
                         "params": params, "seed": None, "prompt_tokens": None, "response_tokens": None,
                         "finish_reason": None, "refusal": None})
    unknown = sorted(set(cfg.generator_labels) - generators)
    if unknown and generators:  # a typo'd key would leave its generator under the file's name, silently
        read = f"the first {cfg.limit} instructions of {path}" if cfg.limit else str(path)
        raise ConfigError(f"candidates.generator_labels: {unknown} name no generator in {read}; its generators "
                          f"are {sorted(generators)} (AnswerN fields or completions[].model): use those names as keys")
    return instructions, rows, rejects


def ingest_candidates(cfg: CandidatesFile) -> StageOutput:
    """Stage `candidates` from a file: the same table the generation path produces."""

    def body(folder: Path) -> dict:
        instructions, rows, rejects = read_candidates_file(cfg)
        metrics = write_candidates(folder, instructions, rows, rejects)
        reasons = Counter(reject_kind(r["reason"]) for r in rejects)
        if not instructions:  # here, not as an empty fit and subset that report success
            found = (f"every row was rejected ({', '.join(f'{k} {n}' for k, n in reasons.most_common())}; each "
                     f"is listed in {folder / 'rejects.jsonl'}): fix them") if rejects else \
                "it holds none: give a file with at least one instruction and its candidate responses"
            raise RecordError(cfg.path, "whole file", None, f"no usable instruction with candidates: {found}")
        metrics.update(reject_counts(r["reason"] for r in rejects))
        summary = (f"Read **{len(rows)}** candidate responses for {len(instructions)} instructions from "
                   f"`{cfg.path}`; {len(rejects)} rejected (see rejects.jsonl): {dict(reasons) or 'none'}.")
        return {"metrics": metrics, "artifacts": ["rejects.jsonl"], "summary": summary}

    config = {"candidates": cfg, "source_digest": file_digest(cfg.path) if Path(cfg.path).exists() else "missing"}
    return run_stage("candidates", config, [], body, digest_of=CANDIDATE_FILES)


ingest_candidates_task = stage_task(ingest_candidates, name="ingest-candidates")


# -------------------------------------------------------------------------------------------------- scoring
FIT_COLUMNS = ["instruction_id", "candidate_index", "generator", "nll_sum", "scored_tokens", "response_tokens",
               "tail_tokens", "response_bytes", "prompt_tokens"]


def group_candidates(rows: Iterable[dict]) -> dict[str, list[dict]]:
    """Candidate rows by instruction id, each list in candidate_index order."""
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["instruction_id"], []).append(row)
    for group in out.values():
        group.sort(key=lambda r: r["candidate_index"])
    return out


def score_candidate_fit(candidates_out: StageOutput, selection: GrapeSelection, progress: bool = True) -> StageOutput:
    """Stage `grape-fit`: NLL sum and token counts of every candidate under the target model, sharded.

    Candidates that cannot be scored (empty, longer than max_length, a template that alters the text, a response
    or instruction message holding one of the target's special tokens as text) go to rejects.jsonl with the
    reason; nothing gets a default score.
    """

    def body(folder: Path) -> dict:
        from tqdm.auto import tqdm

        from models.fit import CandidateGroup, candidate_tokens, score_fit
        from models.loading import load_model

        instructions = load_canonical(candidates_out.file("instructions.jsonl"))
        by_instruction = group_candidates(read_parquet(candidates_out.file("candidates.parquet")))
        size = selection.scoring_shard_size
        # one folder per table: each reads as one parquet dataset
        fits, rejected = ShardedTable(folder / "shards"), ShardedTable(folder / "reject-shards", prefix="rejects")
        n_shards = (len(instructions) + size - 1) // size
        done = fits.done() & rejected.done()
        todo = [s for s in range(n_shards) if s not in done]
        model, tok = load_model(selection.target) if todo else (None, None)
        pattern = special_token_pattern(tok) if todo else None
        for shard in tqdm(todo, desc="grape fit (shards)", disable=not progress):
            groups, meta, rejects = [], [], []
            for record in instructions[shard * size:(shard + 1) * size]:
                messages = instruction_messages(record)
                prompt_ids, targets, kept = None, [], []
                in_prompt = first_special_token(message_texts(messages), pattern)
                for cand in by_instruction.get(record.id, []):
                    # the id, and where the user finds it in their file
                    where = f"instruction {record.id}" + (f" ({record.location})" if record.location else "")
                    if not cand["response"].strip():
                        rejects.append(_reject(where, cand, not_generated_reason(cand)))
                        continue
                    # the target's tokenizer would score such a text as its control token: not the text
                    held = in_prompt or first_special_token([("the response", cand["response"])], pattern)
                    if held:
                        rejects.append(_reject(where, cand, special_token_reason(held[1], held[0])))
                        continue
                    try:
                        tokens = candidate_tokens(tok, messages, [cand["response"]], record.id)[0]
                    except RecordError as err:
                        rejects.append(_reject(where, cand, err.reason))
                        continue
                    target = tokens.target_ids(selection.score_end_of_turn)
                    total = len(tokens.prompt_ids) + len(target)
                    if total > selection.max_length:
                        rejects.append(_reject(where, cand, f"too long: {total} tokens > max_length "
                                                            f"{selection.max_length}"))
                        continue
                    prompt_ids = tokens.prompt_ids
                    targets.append(target)
                    kept.append((cand, tokens))
                if kept:
                    groups.append(CandidateGroup(prompt_ids, tuple(targets)))
                    meta.append(kept)
            scores = score_fit(model, groups, prefix_reuse=selection.prefix_reuse, batch_size=selection.batch_size,
                               pad_id=tok.pad_token_id, progress=False)
            rows = []
            for kept, group_scores in zip(meta, scores):
                for (cand, tokens), score in zip(kept, group_scores):
                    rows.append({"instruction_id": cand["instruction_id"], "candidate_index": cand["candidate_index"],
                                 "generator": cand["generator"], "nll_sum": score.nll_sum,
                                 "scored_tokens": score.n_tokens, "response_tokens": len(tokens.response_ids),
                                 "tail_tokens": len(tokens.tail_ids), "response_bytes": tokens.response_bytes,
                                 "prompt_tokens": len(tokens.prompt_ids)})
            rejected.write(shard, rejects)  # before the fit shard: the fit shard marks the shard done
            fits.write(shard, rows)
        rows = fits.read()
        rejects = [r for r in rejected.read() if r]
        write_parquet(folder / "fit.parquet", rows, FIT_COLUMNS)
        write_jsonl(folder / "rejects.jsonl", rejects)
        report_special_tokens("grape-fit", (r["reason"] for r in rejects), len(rows) + len(rejects), "candidates",
                              folder / "rejects.jsonl")
        reasons = Counter(reject_kind(r["reason"]) for r in rejects)
        metrics = {"candidates_scored": len(rows), "candidates_rejected": len(rejects), "shards": n_shards,
                   "shards_resumed": len(done),
                   "scored_tokens": sum(r["scored_tokens"] for r in rows)}
        metrics.update(reject_counts(r["reason"] for r in rejects))
        summary = (f"Scored **{len(rows)}** candidates under `{selection.target.name_or_path}` "
                   f"({'prefix reuse' if selection.prefix_reuse else 'one pass per candidate'}); "
                   f"{len(rejects)} rejected: {dict(reasons) or 'none'}.")
        return {"metrics": metrics, "artifacts": ["rejects.jsonl"], "summary": summary,
                "params": {"strategy": "prefix_reuse" if selection.prefix_reuse else "plain"}}

    # Batch size and the scoring strategy give the same numbers, so they are not part of the key.
    config = {"target": selection.target, "score_end_of_turn": selection.score_end_of_turn,
              "max_length": selection.max_length, "shard_size": selection.scoring_shard_size}
    return run_stage("grape-fit", config, [candidates_out], body, digest_of=["fit.parquet", "rejects.jsonl"])


NOT_GENERATED = {
    CONTEXT_OVERFLOW: "not generated: the conversation's prompt + max_new_tokens exceed the generator's context "
                      f"(finish_reason {CONTEXT_OVERFLOW})",
    TEMPLATE_REFUSED: "not generated: the generator's chat template refuses this conversation (a system turn?) "
                      f"(finish_reason {TEMPLATE_REFUSED})",
    SPECIAL_TOKEN_FINISH: "not generated: a message of the conversation holds one of the generator's special tokens "
                          f"as text (finish_reason {SPECIAL_TOKEN_FINISH})",
}
"""Reject reasons of a candidate with no text because its generator skipped the conversation, and why."""
SERVER_REFUSED_REASON = "not generated: the generator's server refused this conversation"


def not_generated_reason(cand: dict) -> str:
    """The reject reason of a candidate with no text: why its generator gave none, or an empty response."""
    finish = cand.get("finish_reason")
    if finish == SERVER_REFUSED:
        return f"{SERVER_REFUSED_REASON} ({cand.get('refusal') or 'no message'}) (finish_reason {SERVER_REFUSED})"
    return NOT_GENERATED.get(finish, "empty response")


def _reject(location: str, cand: dict, reason: str) -> dict:
    return RecordError("candidates.parquet", location, f"candidate {cand['candidate_index']} ({cand['generator']})",
                       reason, cand["response"]).as_reject()


score_candidate_fit_task = stage_task(score_candidate_fit, name="grape-fit")


# ------------------------------------------------------------------------------------------------ selection
@dataclass(frozen=True)
class CandidateFit:
    instruction_id: str
    candidate_index: int
    generator: str
    fit: float


def fit_value(row: dict, criterion: Criterion) -> float:
    """The fit of one scored candidate (higher is better)."""
    if criterion == "mean_logprob":
        return -row["nll_sum"] / row["scored_tokens"]
    if criterion == "sum_logprob":
        return -row["nll_sum"]
    if criterion == "per_byte":
        return -row["nll_sum"] / row["response_bytes"]
    raise ValueError(f"unknown criterion {criterion!r}")


def rank_candidates(fit_rows: Iterable[dict], criterion: Criterion) -> dict[str, list[CandidateFit]]:
    """Per instruction, its candidates best first: higher fit, then generator name, then candidate index."""
    ranked: dict[str, list[CandidateFit]] = {}
    for row in fit_rows:
        value = fit_value(row, criterion)
        if not math.isfinite(value):
            raise ScoringError(f"instruction {row['instruction_id']}, candidate {row['candidate_index']}: "
                               f"non-finite fit {value}")
        ranked.setdefault(row["instruction_id"], []).append(
            CandidateFit(row["instruction_id"], row["candidate_index"], row["generator"], value))
    for cands in ranked.values():
        cands.sort(key=lambda c: (-c.fit, c.generator, c.candidate_index))
    return ranked


def dpo_pairs(ranked: dict[str, list[CandidateFit]], responses: dict[tuple[str, int], str],
              prompts: dict[str, list[dict[str, str]]], min_margin: float = 0.0) -> tuple[list[dict], list[dict], Counter]:
    """(TRL conversational preference rows, their metadata, skip counts): chosen = best fit, rejected = worst."""
    pairs, meta, skipped = [], [], Counter()
    for iid, cands in ranked.items():
        if len(cands) < 2:
            skipped["single_candidate"] += 1
            continue
        best, worst = cands[0], cands[-1]
        chosen, rejected = responses[(iid, best.candidate_index)], responses[(iid, worst.candidate_index)]
        margin = best.fit - worst.fit
        if chosen == rejected:
            skipped["identical_texts"] += 1
            continue
        if margin <= 0 or margin < min_margin:
            skipped["margin"] += 1
            continue
        pairs.append({"prompt": prompts[iid], "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}]})
        meta.append({"instruction_id": iid, "chosen_generator": best.generator, "rejected_generator": worst.generator,
                     "chosen_fit": best.fit, "rejected_fit": worst.fit, "margin": margin})
    return pairs, meta, skipped


def _fit_reject_kind(reason: str, selection: GrapeSelection) -> tuple[str, str]:
    """(kind, what fixes it) of a grape-fit reject reason."""
    if reason == NOT_GENERATED[CONTEXT_OVERFLOW]:
        return ("not generated (context overflow)",
                "lower the generators' sampling.max_new_tokens or use generators with a longer context")
    if reason.startswith(SERVER_REFUSED_REASON):
        return ("not generated (server refused)",
                "read the server's message in each reject: a conversation longer than the served model's context "
                "needs a lower sampling.max_new_tokens, a model with a longer context, or dropping it from the data")
    if reason == NOT_GENERATED[TEMPLATE_REFUSED]:
        return ("not generated (template refused)",
                "use generators whose chat template accepts these conversations (a system turn?), or data without "
                "such turns")
    if reason == NOT_GENERATED[SPECIAL_TOKEN_FINISH]:
        return ("not generated (special token)",
                "the instruction's text holds a control token's string of the generator's tokenizer: remove those "
                "strings from the data, or use generators whose tokenizer does not have them")
    kind = reject_kind(reason)
    fixes = {
        "too long": f"raise selection.max_length (now {selection.max_length}), up to the target's context",
        "empty response": "the generators answered with no text: check their model or endpoint and "
                          "sampling.max_new_tokens",
        "template refused": "use a target whose chat template accepts these conversations (a system turn?), or "
                            "data without such turns",
        SPECIAL_TOKEN: "remove those strings from the instructions or responses, or use a target whose tokenizer "
                       "does not have these special tokens",
    }
    if kind in fixes:
        return kind, fixes[kind]
    if "render this response verbatim" in reason or "merges with the chat template" in reason:
        return ("response not separable from the template",
                "use a target whose chat template renders responses as written, so their tokens can be scored")
    return kind, "read the reasons in the rejects file"


def _nothing_scored(n_instructions: int, rejects: list[dict], rejects_file: Path, selection: GrapeSelection) -> str:
    """The message of select-grape's error when grape-fit scored no candidate: counts per reason, the fix of each."""
    head = (f"select-grape: nothing selected: grape-fit scored none of the candidate responses of the "
            f"{n_instructions} instructions")
    if not rejects:
        return f"{head} (there were no candidate responses): check the candidates stage's output"
    kinds = [_fit_reject_kind(r["reason"], selection) for r in rejects]
    counts = Counter(kind for kind, _ in kinds)
    fix_of = dict(kinds)
    listed = ", ".join(f"{kind} {n}" for kind, n in counts.most_common())
    fixes = "; ".join(f"{kind}: {fix_of[kind]}" for kind, _ in counts.most_common())
    return f"{head} ({listed}; each is listed in {rejects_file}): {fixes}"


def grape_select(candidates_out: StageOutput, fit_out: StageOutput, selection: GrapeSelection,
                 output_format: str = "source") -> StageOutput:
    """Stage `select-grape`: the best-fitting response per instruction as the SFT set (+ DPO pairs, plots)."""

    def body(folder: Path) -> dict:
        from tasks.plots import bar_chart, histogram

        instructions = load_canonical(candidates_out.file("instructions.jsonl"))
        candidates = read_parquet(candidates_out.file("candidates.parquet"))
        responses = {(c["instruction_id"], c["candidate_index"]): c["response"] for c in candidates}
        fit_rows = read_parquet(fit_out.file("fit.parquet"))
        ranked = rank_candidates(fit_rows, selection.criterion)
        order = {r.id: i for i, r in enumerate(instructions)}
        scored = [r for r in instructions if r.id in ranked]
        if not scored:
            raise ConfigError(_nothing_scored(len(instructions), read_jsonl(fit_out.file("rejects.jsonl")),
                                              fit_out.file("rejects.jsonl"), selection))
        keep_n = selection.count(len(scored))
        # All instructions (GRAPE), or beyond the paper the N whose winner fits best; ties keep input order.
        kept_ids = {r.id for r in sorted(scored, key=lambda r: (-ranked[r.id][0].fit, order[r.id]))[:keep_n]}
        winners = [r.with_response(responses[(r.id, ranked[r.id][0].candidate_index)])
                   for r in scored if r.id in kept_ids]
        fields = write_subset(winners, [w.id for w in winners], folder, "grape", output_format)

        # per-candidate table (also what the plots show)
        table = []
        for iid, cands in ranked.items():
            for rank, c in enumerate(cands):
                table.append({"instruction_id": iid, "candidate_index": c.candidate_index, "generator": c.generator,
                              "fit": c.fit, "rank": rank, "selected": rank == 0 and iid in kept_ids,
                              "margin_to_next": c.fit - cands[rank + 1].fit if rank + 1 < len(cands) else None})
        write_parquet(folder / "candidate_fit.parquet", table,
                      ["instruction_id", "candidate_index", "generator", "fit", "rank", "selected", "margin_to_next"])
        generators = sorted({c["generator"] for c in candidates})
        wins = Counter(ranked[i][0].generator for i in kept_ids)
        margins = [c[0].fit - c[1].fit for c in ranked.values() if len(c) >= 2]
        label = {"mean_logprob": "mean log-prob per token", "sum_logprob": "summed log-prob",
                 "per_byte": "log-prob per byte"}[selection.criterion]
        bar_chart(generators, [wins.get(g, 0) for g in generators], folder / "winners_by_generator.png",
                  f"GRAPE winners (n={len(kept_ids)})", "instructions won")
        histogram([c.fit for cs in ranked.values() for c in cs], folder / "candidate_fit_hist.png",
                  "Fit of every candidate under the target", label,
                  selected=[ranked[i][0].fit for i in kept_ids], selected_label="kept winners")
        fields["artifacts"] += ["candidate_fit.parquet", "winners_by_generator.png", "candidate_fit_hist.png"]
        if margins:  # no instruction with two candidates has no margin to draw (not a bar at 0)
            histogram(margins, folder / "margin_hist.png", "Best minus second-best fit per instruction",
                      f"margin ({label})")
            fields["artifacts"].append("margin_hist.png")
        metrics = fields["metrics"]
        metrics.update({"instructions": len(instructions), "instructions_scored": len(scored),
                        "instructions_unscored": len(instructions) - len(scored),
                        "candidate_responses": len(fit_rows),
                        "single_candidate_instructions": sum(1 for c in ranked.values() if len(c) == 1),
                        "ties_at_top": sum(1 for c in ranked.values() if len(c) >= 2 and c[0].fit == c[1].fit),
                        "fit_mean_selected": statistics.fmean(ranked[i][0].fit for i in kept_ids) if kept_ids else 0.0})
        if margins:
            metrics.update({"margin_mean": statistics.fmean(margins), "margin_median": statistics.median(margins)})
        for g in generators:
            mine = [c.fit for cs in ranked.values() for c in cs if c.generator == g]
            metrics[f"wins/{g}"] = wins.get(g, 0)
            metrics[f"win_share/{g}"] = wins.get(g, 0) / len(kept_ids) if kept_ids else 0.0
            if mine:
                metrics[f"fit_mean/{g}"] = statistics.fmean(mine)
        rows_md = "\n".join(f"| {g} | {wins.get(g, 0)} |" for g in generators)
        summary = (f"GRAPE ({selection.criterion}) under `{selection.target.name_or_path}`: kept **{len(winners)}** "
                   f"of {len(instructions)} instructions ({len(fit_rows)} candidates scored).\n\n"
                   f"| generator | wins |\n|---|---|\n{rows_md}")
        single = metrics["single_candidate_instructions"]
        if single:
            summary += (f"\n\n**{single} of {len(scored)} scored instructions had a single candidate**: nothing to "
                        "choose, their one response is kept (a generator failed or answered only some, or a "
                        "candidates file lacks answers; `instructions_unscored` and the rejects say which).")
        if selection.dpo.enabled:
            prompts = {r.id: instruction_messages(r) for r in instructions}
            chosen_ranked = {i: ranked[i] for i in ranked if i in kept_ids}
            pairs, meta, skipped = dpo_pairs(chosen_ranked, responses, prompts, selection.dpo.min_margin)
            write_jsonl(folder / "pairs.jsonl", pairs)
            write_jsonl(folder / "pairs_meta.jsonl", meta)
            metrics["dpo_pairs"] = len(pairs)
            metrics.update({f"dpo_skipped[{k}]": v for k, v in sorted(skipped.items())})
            fields["artifacts"].append("pairs_meta.jsonl")
            if pairs:
                fields["datasets"].append({"name": "grape-dpo-pairs", "file": "pairs.jsonl", "context": "training-dpo",
                                           "digest": file_digest(folder / "pairs.jsonl")[:16]})
            summary += (f"\n\nDPO pairs: **{len(pairs)}** (min margin {selection.dpo.min_margin:g}); skipped "
                        f"{dict(skipped) or 'none'}.")
        fields["summary"] = summary
        fields["params"] = {"criterion": selection.criterion, "score_end_of_turn": selection.score_end_of_turn,
                            "tie_break": "fit desc, generator asc, candidate_index asc"}
        return fields

    config = {"criterion": selection.criterion, "dpo": selection.dpo, "budget": selection.budget,
              "share": selection.share, "output_format": output_format}
    files = SUBSET_FILES + (["pairs.jsonl"] if selection.dpo.enabled else [])
    return run_stage("select-grape", config, [candidates_out, fit_out], body, digest_of=files)


grape_select_task = stage_task(grape_select, name="select-grape")
