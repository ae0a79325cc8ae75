"""Deita: complexity and quality scores, the evol score, conversation embeddings, and the diversity filter.

Stages (each content-addressed and resumable):
  `deita-complexity` / `deita-quality`: per-turn expected scores of every record (`scores.jsonl`, `rejects.jsonl`);
  `deita-embed`: one L2-normalised vector per record (`embeddings.npy`, `ids.txt`, `embedding-meta.json`,
  `rejects.jsonl`);
  `select-deita`: rank by the chosen score and keep greedily unless too similar to a kept sample (`ranking.jsonl`
  and the subset files every selection writes).

The scores' arithmetic, the ranking and the diversity filter are plain functions in `tasks/deita_selection.py`.
A record whose texts that a stage tokenizes hold one of its model's special tokens as a string is not scored or
embedded by that stage (`models/special_tokens.py`): a reject, and select-deita lists it with the others.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from configs.deita import DeitaEmbeddingConfig, DeitaScorerConfig, DeitaSelection
from configs.errors import ScoringError
from models.special_tokens import (SPECIAL_TOKEN, first_special_token, message_texts, report_special_tokens,
                                   special_token_pattern, special_token_reason)
from tasks.data import Record, atomic_write_text, load_canonical, read_jsonl, reject_counts, reject_kind, write_jsonl
from tasks.deita_selection import diversity_filter, evol_scores, ranking_order
from tasks.runner import WorkerCache
from tasks.select import SUBSET_FILES, nothing_selected, write_subset
from tasks.store import ArrayShards, ShardedTable, StageOutput, run_stage, stage_task

EMBEDDING_TEMPLATE = "vicuna_v1.1"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


# ------------------------------------------------------------------------------------------- conversations
def conversation_turns(record: Record) -> list[tuple[str, str]]:
    """(instruction, response) pairs; Deita scores each pair on its own."""
    turns = record.turns()
    if any(reply is None for _, reply in turns):
        raise ScoringError(f"record {record.id} ({record.location}) has an unanswered turn: Deita scores answered pairs")
    return [(user, reply) for user, reply in turns]  # type: ignore[misc]


def vicuna_text(record: Record, eos: str) -> str:
    """The whole conversation in FastChat's vicuna_v1.1 layout, as Deita's embedder reads it.

    `eos` stands for the template's literal "</s>" (Llama's EOS text); a record's own system message replaces
    the vicuna system line.
    """
    text = (record.system or VICUNA_SYSTEM) + " "
    for user, reply in record.turns():
        text += f"USER: {user} ASSISTANT:"
        if reply is not None:
            text += f" {reply}{eos}"
    return text


# ---------------------------------------------------------------------------------------- scoring stages
def _scorer_stage_config(dimension: str, scorer: DeitaScorerConfig) -> dict:
    # batch size and runner change no score: kept out of the key so a rerun with other ones reuses the stage
    return {"dimension": dimension, "scorer": scorer.model_dump(mode="json", exclude={"batch_size", "scale_out"})}


def held_special_token(tokenizer, records: list[Record], roles: tuple[str, ...]) -> dict[str, str]:
    """{record id: reject reason} of the records whose messages of `roles` hold one of the tokenizer's special
    tokens as text: it would read them as that control token, so they are not scored or embedded."""
    pattern = special_token_pattern(tokenizer)
    held = {r.id: first_special_token(message_texts(r.messages, roles), pattern) for r in records}
    return {rid: special_token_reason(hit[1], hit[0]) for rid, hit in held.items() if hit}


def dimension_rows(scorer, records: list[Record]) -> list[dict]:
    """Per-turn expected scores of `records` ({id, scores, reject}); a too-long prompt rejects its record, and so
    does a text of its prompts (complexity: the user's; quality: theirs and the replies) holding one of the
    scorer's special tokens."""
    roles = ("user",) if scorer.dimension == "complexity" else ("user", "assistant")
    held = held_special_token(scorer.tokenizer, records, roles)
    encoded = [[] if r.id in held else scorer.encode([scorer.prompt(u, a) for u, a in conversation_turns(r)])
               for r in records]
    rows, flat, owners = [], [], []
    for r, prompts in zip(records, encoded):
        if r.id in held:
            rows.append({"id": r.id, "scores": [], "reject": held[r.id]})
            continue
        long = scorer.too_long(prompts)
        if long:
            lengths = [len(prompts[t]) for t in long]
            rows.append({"id": r.id, "scores": [], "reject": f"prompt too long: turn {long[0]} has "
                         f"{lengths[0]} tokens > {scorer.max_prompt_tokens}"})
            continue
        rows.append({"id": r.id, "scores": [], "reject": ""})
        owners += [len(rows) - 1] * len(prompts)
        flat += prompts
    if flat:
        try:
            values = scorer.score_encoded(flat)
        except ScoringError as err:
            if not getattr(err, "rows", None):
                raise
            # the flat prompt index means nothing to the user: name the record, its place in the file and the turn
            first = err.rows[0]
            record = records[owners[first]]
            turn = first - owners.index(owners[first])
            raise ScoringError(
                f"deita-{scorer.dimension}: the scorer gave non-finite score-token logits for {len(err.rows)} "
                f"turn(s) of this shard, first record {record.id} ({record.location}), turn {turn}; no score is made "
                "up for them: check the scorer model and its dtype (float16 overflows)") from err
        for owner, value in zip(owners, values.tolist()):
            rows[owner]["scores"].append(float(value))
    return rows


# One scorer per worker process: a scorer is a whole LLM (Deita's are 7B/13B), the complexity and quality stages
# run one after another and a shard uses one, so keeping the other would only hold its memory.
_WORKER_SCORERS = WorkerCache(size=1)


def _worker_scorer(dimension: str, scorer_json: str):
    """The Deita scorer of a worker process, per dimension and model files (`model_files_stamp`), for a `with`
    block."""
    from models.deita import DeitaScorer
    from tasks.runner import model_files_stamp

    config = DeitaScorerConfig.model_validate_json(scorer_json)
    return _WORKER_SCORERS.use((dimension, scorer_json), model_files_stamp(config.model), lambda: DeitaScorer.load(
        config.model, dimension, config.kind, config.batch_size, config.max_prompt_tokens))


def dimension_shard_at(index: int, records_path: str, dimension: str, scorer_config: DeitaScorerConfig) -> list[dict]:
    """Shard `index` of a deita-<dimension> stage, computed in whatever process the task runner chose."""
    from tasks.runner import worker_records

    size = scorer_config.shard_size
    with _worker_scorer(dimension, scorer_config.model_dump_json()) as scorer:
        return dimension_rows(scorer, worker_records(records_path)[index * size:(index + 1) * size])


def score_dimension(dimension: str, records_out: StageOutput, scorer_config: DeitaScorerConfig,
                    progress: bool = True) -> StageOutput:
    """Stage `deita-<dimension>`: per-turn expected scores of every record, sharded and resumable.

    Writes `scores.jsonl` ({id, scores: [per turn]}) and `rejects.jsonl` (records whose prompt is too long for
    the scorer: rejected, never truncated and never given a default score).
    """
    from models.deita import DeitaScorer, detect_kind, score_token_ids, scorer_params
    from models.loading import load_tokenizer
    from tasks.plots import histogram

    def body(folder: Path) -> dict:
        records = load_canonical(records_out.file("records.jsonl"))
        name = scorer_config.model.name_or_path
        kind = detect_kind(name, dimension, scorer_config.kind)
        params = scorer_params(dimension, name, kind, score_token_ids(load_tokenizer(scorer_config.model)))
        table = ShardedTable(folder / "shards")
        size = scorer_config.shard_size
        n_shards = math.ceil(len(records) / size)
        todo = table.todo(n_shards)
        if todo and scorer_config.scale_out is not None:
            from tasks.runner import map_shards

            map_shards(dimension_shard_at, n_shards, table, scorer_config.scale_out, name=f"deita-{dimension}",
                       progress=progress, records_path=str(records_out.file("records.jsonl")),
                       dimension=dimension, scorer_config=scorer_config)
            todo = []
        shards = todo
        if progress:
            from tqdm.auto import tqdm

            shards = tqdm(todo, desc=f"deita {dimension} (shards)", unit="shard")
        scorer = None  # the model loads only when a shard is scored in this process
        for shard in shards:
            scorer = scorer or DeitaScorer.load(scorer_config.model, dimension, scorer_config.kind,
                                                scorer_config.batch_size, scorer_config.max_prompt_tokens)
            table.write(shard, dimension_rows(scorer, records[shard * size:(shard + 1) * size]))
        rows = table.read()
        by_id = {r.id: r for r in records}
        scored = [{"id": row["id"], "scores": row["scores"]} for row in rows if not row["reject"]]
        rejects = [{"id": row["id"], "location": by_id[row["id"]].location, "stage": f"deita-{dimension}",
                    "reason": row["reject"]} for row in rows if row["reject"]]
        write_jsonl(folder / "scores.jsonl", scored)
        write_jsonl(folder / "rejects.jsonl", rejects)
        report_special_tokens(f"deita-{dimension}", (r["reason"] for r in rejects), len(rows), "records",
                              folder / "rejects.jsonl")
        turn_scores = np.asarray([v for row in scored for v in row["scores"]], dtype=np.float64)
        artifacts = ["rejects.jsonl", "scores.jsonl"]
        metrics = {"records": len(records), "scored": len(scored), "rejected": len(rejects), "turns": len(turn_scores)}
        metrics.update(reject_counts(r["reason"] for r in rejects))
        if len(turn_scores):
            histogram(turn_scores, folder / f"{dimension}_hist.png", f"Deita {dimension} (per turn)",
                      f"expected {dimension} score (1-6)")
            artifacts.append(f"{dimension}_hist.png")
            metrics.update({f"{dimension}_mean": float(turn_scores.mean()), f"{dimension}_std": float(turn_scores.std()),
                            f"{dimension}_min": float(turn_scores.min()), f"{dimension}_max": float(turn_scores.max())})
        note = " (approximate: not a released Deita scorer)" if kind == "approximate" else ""
        summary = (f"Deita {dimension} with `{name}`{note}: scored **{len(scored)}** of {len(records)} records "
                   f"({len(turn_scores)} turns), {len(rejects)} rejected (see rejects.jsonl).")
        return {"metrics": metrics, "params": params, "artifacts": artifacts, "summary": summary}

    return run_stage(f"deita-{dimension}", _scorer_stage_config(dimension, scorer_config), [records_out], body,
                     digest_of=["scores.jsonl", "rejects.jsonl"])


def score_complexity(records_out: StageOutput, scorer_config: DeitaScorerConfig) -> StageOutput:
    return score_dimension("complexity", records_out, scorer_config)


def score_quality(records_out: StageOutput, scorer_config: DeitaScorerConfig) -> StageOutput:
    return score_dimension("quality", records_out, scorer_config)


# --------------------------------------------------------------------------------------- embedding stage
def embedding_rejects(tokenizer, records: list[Record]) -> dict[str, str]:
    """{record id: reason} of the records deita-embed leaves out: a message (any: the vicuna text holds them all)
    holding one of the embedder's special tokens as text."""
    return held_special_token(tokenizer, records, ("system", "user", "assistant"))


def embed_shard(model, tokenizer, records: list[Record], embedding: DeitaEmbeddingConfig) -> np.ndarray:
    """The rows of the shard's records, less those `embedding_rejects` leaves out, in record order."""
    from models.embeddings import embed_texts

    eos = tokenizer.eos_token or ""
    left_out = embedding_rejects(tokenizer, records)
    return embed_texts(model, tokenizer, [vicuna_text(r, eos) for r in records if r.id not in left_out],
                       pooling=embedding.pooling, batch_size=embedding.batch_size, normalize=True,
                       max_length=embedding.max_length)


def truncated_conversations(tokenizer, records: list[Record], max_length: int, chunk: int = 512) -> int:
    """How many conversations the embedding cuts at `max_length` (their vicuna text is longer). Deita's embedder
    cuts them too; pomona counts them, since a long ShareGPT conversation is then embedded from its start only."""
    eos = tokenizer.eos_token or ""
    cut = 0
    for start in range(0, len(records), chunk):  # chunks: the token lists of 17k conversations at once are large
        texts = [vicuna_text(r, eos) for r in records[start:start + chunk]]
        cut += sum(len(ids) > max_length for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])
    return cut


def embed_shard_at(index: int, records_path: str, embedding: DeitaEmbeddingConfig) -> np.ndarray:
    """Shard `index` of a deita-embed stage, computed in whatever process the task runner chose."""
    from tasks.runner import worker_model, worker_records

    size = embedding.shard_size
    with worker_model(embedding.model.model_dump_json()) as (model, tokenizer):
        return embed_shard(model, tokenizer, worker_records(records_path)[index * size:(index + 1) * size], embedding)


def embed_records(records_out: StageOutput, embedding: DeitaEmbeddingConfig, progress: bool = True) -> StageOutput:
    """Stage `deita-embed`: one L2-normalised vector per record, in record order, shard by shard.

    Output: `embeddings.npy` (float32 [n, hidden], memory-mappable), `ids.txt` (the id of each row),
    `embedding-meta.json`, `rejects.jsonl` (records holding one of the embedder's special tokens as text: not
    embedded, no row).
    """
    from models.loading import load_model, load_tokenizer

    def body(folder: Path) -> dict:
        import os

        records = load_canonical(records_out.file("records.jsonl"))
        tokenizer = load_tokenizer(embedding.model)
        left_out = embedding_rejects(tokenizer, records)
        write_jsonl(folder / "rejects.jsonl", [{"id": r.id, "location": r.location, "stage": "deita-embed",
                                                "reason": left_out[r.id]} for r in records if r.id in left_out])
        report_special_tokens("deita-embed", left_out.values(), len(records), "records", folder / "rejects.jsonl")
        kept = [r for r in records if r.id not in left_out]
        shards = ArrayShards(folder / "shards")
        size = embedding.shard_size
        n_shards = math.ceil(len(records) / size)
        final = folder / "embeddings.npy"
        if not final.exists():  # written last and atomically: present means every shard went into it
            todo = shards.todo(n_shards)
            if todo and embedding.scale_out is not None:
                from tasks.runner import map_shards

                map_shards(embed_shard_at, n_shards, shards, embedding.scale_out, name="deita-embed",
                           progress=progress, write=shards.write_array,
                           records_path=str(records_out.file("records.jsonl")), embedding=embedding)
            elif todo:
                model, tokenizer = load_model(embedding.model)
                loop = todo
                if progress:
                    from tqdm.auto import tqdm

                    loop = tqdm(todo, desc="deita embed (shards)", unit="shard")
                for shard in loop:
                    shards.write_array(shard, embed_shard(model, tokenizer, records[shard * size:(shard + 1) * size],
                                                          embedding))
            # One memory-mappable matrix for the filter; the shards go once it exists (digests stay in the manifest).
            shards.verified()
            dim = shards.read_array(0).shape[1] if n_shards else 0
            tmp = folder / f".embeddings.tmp-{os.getpid()}.npy"
            matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(kept), dim))
            row = 0
            for shard in range(n_shards):  # a shard has a row per record it kept
                block = shards.read_array(shard)
                matrix[row:row + len(block)] = block
                row += len(block)
            if row != len(kept):
                raise RuntimeError(f"deita-embed shards hold {row} rows for {len(kept)} embedded records in {folder}")
            matrix.flush()
            del matrix
            os.replace(tmp, final)
        dim = int(np.load(final, mmap_mode="r").shape[1])
        for shard in range(n_shards):
            shards.shard_path(shard).unlink(missing_ok=True)
        atomic_write_text(folder / "ids.txt", "".join(r.id + "\n" for r in kept))
        meta = {"model": embedding.model.name_or_path, "pooling": embedding.pooling, "template": EMBEDDING_TEMPLATE,
                "max_length": embedding.max_length, "dim": dim, "normalized": True, "rows": len(kept)}
        truncated = truncated_conversations(tokenizer, kept, embedding.max_length)
        meta["truncated"] = truncated
        atomic_write_text(folder / "embedding-meta.json", json.dumps(meta, indent=1))
        note = (f" {truncated} conversations are longer than max_length {embedding.max_length} and were embedded "
                "from their first tokens only." if truncated else "")
        if left_out:
            note += (f" {len(left_out)} hold one of the embedder's special tokens as text and were not embedded "
                     "(see rejects.jsonl).")
        metrics = {"records": len(records), "embedded": len(kept), "rejected": len(left_out), "dim": dim,
                   "truncated": truncated, **reject_counts(left_out.values())}
        return {"metrics": metrics,
                "params": {"embedding_model": embedding.model.name_or_path, "embedding_pooling": embedding.pooling,
                           "embedding_template": EMBEDDING_TEMPLATE},
                "artifacts": ["embedding-meta.json", "rejects.jsonl"],
                "summary": f"Embedded **{len(kept)}** of {len(records)} conversations with "
                           f"`{embedding.model.name_or_path}` ({embedding.pooling} pooling, {EMBEDDING_TEMPLATE} "
                           f"template, dim {dim}).{note}"}

    key_config = embedding.model_dump(mode="json", exclude={"batch_size", "scale_out"})
    return run_stage("deita-embed", {"embedding": key_config, "template": EMBEDDING_TEMPLATE}, [records_out], body,
                     digest_of=["embeddings.npy", "ids.txt"])


# ------------------------------------------------------------------------------------------ filter stage
def _per_turn(out: StageOutput | None) -> tuple[dict[str, list[float]], list[dict]]:
    if out is None:
        return {}, []
    scores = {row["id"]: row["scores"] for row in read_jsonl(out.file("scores.jsonl"))}
    return scores, read_jsonl(out.file("rejects.jsonl"))


def _unscored(records: list, scored: set[str], rejects: dict[str, list[dict]]) -> list[dict]:
    """One line per record without every score it needs, in input order, with every scorer's reason for it.

    `stage` and `reason` join those of each scorer that refused it (`deita-complexity+deita-quality`, reasons with
    "; "); `reasons` keeps them apart ({stage, reason}). A record missing a score that no scorer refused means the
    score files do not belong to these records: an error, not a quietly dropped record.
    """
    by_id: dict[str, list[dict]] = {}
    for stage, rows in rejects.items():
        for row in rows:
            by_id.setdefault(row["id"], []).append({"stage": stage, "reason": row["reason"]})
    lines = []
    for r in records:
        if r.id in scored:
            continue
        reasons = by_id.get(r.id)
        if not reasons:
            raise ValueError(f"record {r.id} ({r.location}) has no Deita score and no scorer rejected it: the score "
                             "stages were run on other records")
        lines.append({"id": r.id, "location": r.location, "stage": "+".join(x["stage"] for x in reasons),
                      "reason": "; ".join(x["reason"] for x in reasons), "reasons": reasons})
    return lines


_SETTING_OF_STAGE = {"deita-complexity": "selection.complexity_scorer", "deita-quality": "selection.quality_scorer",
                     "deita-embed": "selection.embedding"}


def _why_none_scored(needed: list[str], unscored: list[dict]) -> str:
    """What select-deita's "nothing selected" error says when no record has every score and an embedding: the
    records per reject kind (a record counted once per kind, however many stages refused it for it), the stages
    whose rejects.jsonl list them, and the fix of each kind."""
    kinds: Counter = Counter()
    stages_of: dict[str, dict[str, None]] = {}
    for row in unscored:
        for kind in dict.fromkeys(reject_kind(r["reason"]) for r in row["reasons"]):
            kinds[kind] += 1
        for r in row["reasons"]:
            stages_of.setdefault(reject_kind(r["reason"]), {})[r["stage"]] = None
    stages = list(dict.fromkeys(stage for row in unscored for stage in row["stage"].split("+")))
    who = f"the {' and '.join(needed)} scorer{'s' if len(needed) > 1 else ''}"
    if "deita-embed" in stages:
        who += " and the embedder"
    listed = ", ".join(f"{kind} {n}" for kind, n in kinds.most_common())

    def fix(kind: str) -> str:
        settings = [_SETTING_OF_STAGE.get(s, s) for s in stages_of[kind]]
        if kind == "prompt too long":
            return (f"raise max_prompt_tokens of {' and '.join(settings)}, or leave it unset to use the model's "
                    "context length")
        if kind == SPECIAL_TOKEN:
            return (f"the text holds a control token's string (of the tokenizer of "
                    f"{' and '.join(s + '.model' for s in settings)}): clean those strings from the data, or use a "
                    "model whose tokenizer lacks them")
        return "read the reasons in the rejects.jsonl"

    fixes = "; ".join(f"{kind}: {fix(kind)}" for kind, _ in kinds.most_common())
    return (f"{who} left no record with a score{' and an embedding' if 'deita-embed' in stages else ''} ({listed}; "
            f"each is listed in the rejects.jsonl of {', '.join(stages)}): {fixes}")


def select_deita(records_out: StageOutput, complexity_out: StageOutput | None, quality_out: StageOutput | None,
                 embeddings_out: StageOutput, selection: DeitaSelection, output_format: str = "source",
                 progress: bool = True) -> StageOutput:
    """Stage `select-deita`: rank by the configured score, run the diversity filter, write the subset."""
    from tasks.plots import histogram, scatter

    def body(folder: Path) -> dict:
        records = load_canonical(records_out.file("records.jsonl"))
        complexity, rejects_c = _per_turn(complexity_out)
        quality, rejects_q = _per_turn(quality_out)
        needed = [s for s, out in (("complexity", complexity_out), ("quality", quality_out)) if out is not None]
        if (selection.score in ("evol", "complexity") and complexity_out is None) or \
                (selection.score in ("evol", "quality") and quality_out is None):
            raise ValueError(f"score {selection.score!r} needs the scores it is built from")
        ids = Path(embeddings_out.file("ids.txt")).read_text().split()
        rejects_e = read_jsonl(embeddings_out.file("rejects.jsonl"))
        not_embedded = {row["id"] for row in rejects_e}
        if ids != [r.id for r in records if r.id not in not_embedded]:
            raise ValueError("the embeddings were computed for other records than these (ids.txt differs)")
        embeddings = np.load(embeddings_out.file("embeddings.npy"), mmap_mode="r")
        row_of = {rid: k for k, rid in enumerate(ids)}  # record id -> its embedding row
        tables = [{"complexity": complexity, "quality": quality}[s] for s in needed]
        rows = [i for i, r in enumerate(records) if r.id in row_of and all(r.id in table for table in tables)]
        cand = [records[i] for i in rows]
        unscored = _unscored(records, {r.id for r in cand},
                             {"deita-complexity": rejects_c, "deita-quality": rejects_q, "deita-embed": rejects_e})
        if not cand:
            raise nothing_selected("select-deita", records_out, _why_none_scored(needed, unscored))
        c_turns = [complexity[r.id] for r in cand] if complexity_out is not None else None
        q_turns = [quality[r.id] for r in cand] if quality_out is not None else None
        scores = evol_scores(c_turns, q_turns, selection.score)
        order = np.asarray(rows, dtype=np.int64)[ranking_order(scores)]
        count = selection.count(len(cand))
        device = None if selection.filter_device == "auto" else selection.filter_device
        result = diversity_filter(embeddings, [row_of[records[i].id] for i in order.tolist()], selection.tau, count,
                                  selection.filter_block_size, device, progress=progress,
                                  precision=selection.filter_precision)
        record_of = {row_of[records[i].id]: i for i in rows}
        selected = [record_of[k] for k in result.selected.tolist()]  # record indices, in the order kept

        score_of = dict(zip(rows, scores.tolist()))
        kept = set(selected)
        ranking = []
        for rank, i in enumerate(order.tolist()):
            status = "selected" if i in kept else ("rejected_similar" if rank < result.examined else "not_examined")
            ranking.append({"rank": rank, "id": records[i].id, "score": score_of[i], "status": status,
                            "complexity": complexity.get(records[i].id), "quality": quality.get(records[i].id)})
        write_jsonl(folder / "ranking.jsonl", ranking)
        write_jsonl(folder / "rejects.jsonl", unscored)
        fields = write_subset(records, [records[i].id for i in selected], folder, "deita", output_format)

        artifacts = ["ranking.jsonl", "rejects.jsonl"]
        if len(scores):
            # the picks against all candidates: how far down the ranking the diversity filter had to reach
            histogram(scores, folder / "score_hist.png", f"Deita {selection.score} score", f"{selection.score} score",
                      selected=[score_of[i] for i in selected])
            artifacts.append("score_hist.png")
        if c_turns is not None and q_turns is not None and len(cand):
            scatter([v for t in c_turns for v in t], [v for t in q_turns for v in t], folder / "complexity_vs_quality.png",
                    "Deita complexity vs quality (per turn)", "complexity", "quality")
            artifacts.append("complexity_vs_quality.png")
        fields["artifacts"] = artifacts + fields["artifacts"]
        fields["metrics"].update({
            "candidates": len(cand), "unscored": len(unscored), "budget": count,
            "examined": result.examined, "rejected_similar": result.rejected,
            "not_examined": len(cand) - result.examined, "tau": selection.tau,
        })
        if selected:
            fields["metrics"]["selected_score_mean"] = float(np.mean([score_of[i] for i in selected]))
        if len(scores):
            fields["metrics"]["candidate_score_mean"] = float(scores.mean())
        fields["params"] = {"score": selection.score, "tau": selection.tau, "budget": count}
        fields["summary"] = (
            f"Deita ({selection.score} score, tau {selection.tau}): kept **{len(selected)}** of {len(cand)} "
            f"scored candidates (budget {count}); the filter rejected **{result.rejected}** as near-duplicates of "
            f"kept samples, {len(cand) - result.examined} were not reached, {len(records) - len(cand)} records "
            "had no score (see rejects.jsonl).")
        return fields

    config = {"selection": selection.model_dump(mode="json", include={"budget", "share", "score", "tau"}),
              "output_format": output_format}
    return run_stage("select-deita", config, [records_out, complexity_out, quality_out, embeddings_out], body,
                     digest_of=SUBSET_FILES)


# ---------------------------------------------------------------------------------------- Prefect tasks
deita_complexity_task = stage_task(score_complexity, name="deita-complexity")
deita_quality_task = stage_task(score_quality, name="deita-quality")
deita_embed_task = stage_task(embed_records, name="deita-embed")
deita_select_task = stage_task(select_deita, name="select-deita")
