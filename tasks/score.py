"""Stage `score`: conditioned and direct NLL of every record under a scorer model, in resumable parquet shards.

Records are cut into shards of `shard_size` in input order; each shard is templated, scored by the batched engine
and written atomically (`scores/part-NNNNN.parquet` + manifest) before the next starts, so a killed run resumes at
the next unfinished shard. Batches never cross shards, so a resumed table is identical to an uninterrupted one.

A sample the template cannot score (reason from models/templates.py), whose own texts hold one of the scorer's
special tokens as a string (`models/special_tokens.py`: the tokenizer would score that control token, not the text),
or whose loss is NaN/inf gets status `skipped` / `nonfinite`, no numbers, and a line in `rejects.jsonl`; it is never
given a score.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from configs.ifd import ScoringConfig
from configs.schema import ModelConfig
from models.likelihood import score_requests
from models.special_tokens import (first_special_token, message_texts, report_special_tokens, special_token_pattern,
                                   special_token_reason)
from models.templates import ScorePair, build_pair
from tasks.data import Record, load_canonical, reject_kind, write_jsonl
from tasks.store import ShardedTable, StageOutput, run_stage, stage_task

SCORES_DIR = "scores"
STATUS_SCORED, STATUS_SKIPPED, STATUS_NONFINITE = "scored", "skipped", "nonfinite"


def scorer_model(scoring: ScoringConfig, scorer_stage: StageOutput | None) -> ModelConfig:
    """The scoring model: the configured one, or the model folder an upstream stage trained (Cherry's pre-experience)."""
    if scorer_stage is None:
        return scoring.scorer
    return scoring.scorer.model_copy(update={"name_or_path": str(scorer_stage.file(scorer_stage.params["model_dir"])),
                                             "gguf_file": None})


def scored_texts(record: Record, output: bool = True) -> list[tuple[str, str]]:
    """(where, text) of a record's own texts that the IFD templates score (`Record.alpaca_fields`): an Alpaca row's
    instruction, input and output; else the first user message and its reply. `output=False`: the instruction's
    only (what cherry-instructions scores)."""
    if record.source_format == "alpaca":
        instruction, input_text, reply = record.alpaca_fields()
        texts = [("field 'instruction'", instruction), ("field 'input'", input_text), ("field 'output'", reply)]
        return texts if output else texts[:2]
    first = next(i for i, m in enumerate(record.messages) if m["role"] != "system")
    return message_texts(record.messages)[first:first + (2 if output else 1)]


def score_pair(record: Record, tokenizer, pattern, scoring: ScoringConfig) -> ScorePair:
    """The two requests of a record, or why it is not scored (its texts hold a special token's string, or
    `build_pair`'s reasons)."""
    held = first_special_token(scored_texts(record), pattern)
    if held:
        return ScorePair(None, None, None, False, special_token_reason(held[1], held[0]))
    return build_pair(scoring.template, tokenizer, *record.alpaca_fields(), scoring.max_length, scoring.overlong)


def score_shard(model, tokenizer, records: list[Record], first_index: int, scoring: ScoringConfig,
                progress: bool = False) -> list[dict[str, Any]]:
    """One row per record: status, reason, token counts and NLL sums of both passes (None when not scored)."""
    pattern = special_token_pattern(tokenizer)
    pairs = [score_pair(r, tokenizer, pattern, scoring) for r in records]
    requests = [req for p in pairs if p.skip_reason is None for req in (p.conditioned, p.direct)]
    scores = score_requests(model, requests, batch_size=scoring.batch_size, pad_id=int(tokenizer.pad_token_id or 0),
                            progress=progress, max_batch_tokens=scoring.max_batch_tokens, nonfinite="return")
    rows, k = [], 0
    for offset, (record, pair) in enumerate(zip(records, pairs)):
        row: dict[str, Any] = {
            "index": first_index + offset, "id": record.id, "status": STATUS_SKIPPED, "reason": pair.skip_reason,
            "truncated": pair.truncated, "instruction_tokens": pair.instruction_tokens,
            "cond_nll_sum": None, "cond_tokens": None, "cond_mean_nll": None,
            "direct_nll_sum": None, "direct_tokens": None, "direct_mean_nll": None, "seq_tokens": 0,
        }
        if pair.skip_reason is None:
            cond, direct = scores[k], scores[k + 1]
            k += 2
            row["seq_tokens"] = len(pair.conditioned.input_ids) + len(pair.direct.input_ids)
            if cond.finite and direct.finite:
                row.update(status=STATUS_SCORED, cond_nll_sum=cond.nll_sum, cond_tokens=cond.n_tokens,
                           cond_mean_nll=cond.mean_nll, direct_nll_sum=direct.nll_sum,
                           direct_tokens=direct.n_tokens, direct_mean_nll=direct.mean_nll)
            else:
                row.update(status=STATUS_NONFINITE,
                           reason=f"non-finite loss (conditioned {cond.nll_sum}, direct {direct.nll_sum})")
        rows.append(row)
    return rows


def score_shard_at(index: int, records_path: str, scoring: ScoringConfig, model_cfg: ModelConfig) -> list[dict[str, Any]]:
    """Shard `index` of a score stage, computed from paths in whatever process the task runner chose."""
    from tasks.runner import worker_model, worker_records

    records = worker_records(records_path)
    start = index * scoring.shard_size
    with worker_model(model_cfg.model_dump_json()) as (model, tokenizer):
        return score_shard(model, tokenizer, records[start:start + scoring.shard_size], start, scoring)


def read_scores(scores_out: StageOutput) -> list[dict[str, Any]]:
    """The score table of a finished stage, in input order."""
    return ShardedTable(Path(scores_out.path) / SCORES_DIR).read()


def skip_kind(reason: str) -> str:
    """What a skip reason is counted as: its text before a colon or a parenthesis ("special token in the text",
    "non-finite loss", "instruction fills max_length")."""
    return reject_kind(reason).split(" (")[0]


def score_counts(rows: list[dict[str, Any]]) -> dict[str, float]:
    reasons = Counter(skip_kind(r["reason"]) for r in rows if r["status"] != STATUS_SCORED)
    counts: dict[str, float] = {
        "samples": len(rows),
        "scored": sum(r["status"] == STATUS_SCORED for r in rows),
        "skipped": sum(r["status"] == STATUS_SKIPPED for r in rows),
        "nonfinite": sum(r["status"] == STATUS_NONFINITE for r in rows),
        "truncated": sum(bool(r["truncated"]) for r in rows),
        "tokens_scored": sum(r["seq_tokens"] for r in rows),
    }
    counts.update({f"skipped[{reason}]": n for reason, n in sorted(reasons.items())})
    return counts


def score_records(records_out: StageOutput, scoring: ScoringConfig, scorer_stage: StageOutput | None = None,
                  progress: bool = True) -> StageOutput:
    """Stage `score`: see the module docstring. `scorer_stage` (a trained model) replaces `scoring.scorer`."""
    model_cfg = scorer_model(scoring, scorer_stage)

    def body(folder: Path) -> dict:
        records = load_canonical(records_out.file("records.jsonl"))
        table = ShardedTable(folder / SCORES_DIR)
        starts = list(range(0, len(records), scoring.shard_size))
        todo = [starts[n] for n in table.todo(len(starts))]
        if todo and scoring.scale_out is not None:
            from tasks.runner import map_shards

            map_shards(score_shard_at, len(starts), table, scoring.scale_out, name="score", progress=progress,
                       records_path=str(records_out.file("records.jsonl")), scoring=scoring, model_cfg=model_cfg)
        elif todo:
            from models.loading import load_model

            model, tokenizer = load_model(model_cfg)
            shards = todo
            if progress:
                from tqdm.auto import tqdm

                shards = tqdm(todo, desc=f"score shards ({len(starts) - len(todo)} done before)", unit="shard")
            for start in shards:
                chunk = records[start:start + scoring.shard_size]
                table.write(start // scoring.shard_size, score_shard(model, tokenizer, chunk, start, scoring))
        rows = table.read()
        if len(rows) != len(records):
            raise RuntimeError(f"score table has {len(rows)} rows for {len(records)} records in {folder}")
        by_id = {r.id: r for r in records}
        write_jsonl(folder / "rejects.jsonl",
                    ({"id": row["id"], "location": by_id[row["id"]].location, "status": row["status"],
                      "reason": row["reason"]} for row in rows if row["status"] != STATUS_SCORED))
        held = report_special_tokens("score", (r["reason"] for r in rows if r["status"] != STATUS_SCORED), len(rows),
                                     "samples", folder / "rejects.jsonl")
        counts = score_counts(rows)
        # The IFD templates are single-turn (as the authors' scripts): later turns of a conversation are not
        # scored, and that is counted rather than left unsaid.
        # An Alpaca row with `history` is scored on its own instruction/output, its last turn (what the reference
        # scripts read from such a row), not its first: counted apart so the summary says which turn was scored.
        counts["first_turn_only"] = sum(len(r.turns()) > 1 and r.source_format != "alpaca" for r in records)
        counts["last_turn_only"] = sum(len(r.turns()) > 1 and r.source_format == "alpaca" for r in records)
        scored = [r for r in rows if r["status"] == STATUS_SCORED]
        if scored:
            counts["mean_cond_nll"] = sum(r["cond_mean_nll"] for r in scored) / len(scored)
            counts["mean_direct_nll"] = sum(r["direct_mean_nll"] for r in scored) / len(scored)
        summary = (f"Scored **{int(counts['scored'])}** of {len(rows)} samples with `{model_cfg.name_or_path}` "
                   f"(template `{scoring.template}`, max_length {scoring.max_length}): {int(counts['skipped'])} "
                   f"skipped, {int(counts['nonfinite'])} non-finite (see rejects.jsonl), "
                   f"{int(counts['truncated'])} truncated.")
        if held:
            summary += (f" {held} hold one of the scorer's special tokens as text and were not scored (the tokenizer "
                        "would read it as that control token).")
        if counts["first_turn_only"]:
            summary += (f" {int(counts['first_turn_only'])} multi-turn records were scored on their first turn "
                        "only (the IFD templates are single-turn).")
        if counts["last_turn_only"]:
            summary += (f" {int(counts['last_turn_only'])} Alpaca records with a history were scored on their "
                        "instruction and output only (the last turn; the history is not scored).")
        return {"metrics": counts, "artifacts": ["rejects.jsonl"], "summary": summary,
                "params": {"scorer": model_cfg.name_or_path, "template": scoring.template,
                           "max_length": scoring.max_length}}

    inputs: list[Any] = [records_out] + ([scorer_stage] if scorer_stage is not None else [])
    return run_stage("score", {"scoring": scoring, "pre_experienced": scorer_stage is not None}, inputs, body)


score_task = stage_task(score_records, name="score-likelihood")

