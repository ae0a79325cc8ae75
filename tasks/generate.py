"""Stage `generate`: every generator answers every instruction; stage `candidates`: one table of all answers.

Each generator is its own stage (its own content-addressed folder), written in resumable shards: a generator that
fails keeps the shards it finished, and never touches the other generators' folders. The `candidates` stage then
merges the generators that succeeded into the table GRAPE scores, and records any that failed.

The candidates table (`candidates.parquet`), shared with the bring-your-own-candidates path in `tasks/grape.py`:
instruction_id, candidate_index, generator, response, params (JSON: backend, model, sampling, seed scope),
seed, prompt_tokens, response_tokens (the generator's own counts; null when a source does not say),
finish_reason, refusal (finish_reason `server_refused`: the HTTP status and the server's message; else null).
`instructions.jsonl` holds the instructions as canonical records (their id is `instruction_id`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from configs.grape import GeneratorConfig
from tasks.data import Record, load_canonical, save_canonical, write_jsonl
from tasks.runner import WorkerCache
from tasks.store import ShardedTable, StageOutput, atomic_write_text, run_stage, stage_task, writer_id

CANDIDATE_COLUMNS = ["instruction_id", "candidate_index", "generator", "response", "params", "seed",
                     "prompt_tokens", "response_tokens", "finish_reason", "refusal"]
CANDIDATE_FILES = ["instructions.jsonl", "candidates.parquet", "rejects.jsonl"]


def instruction_messages(record: Record) -> list[dict[str, str]]:
    """The conversation up to the last user turn: what a generator answers (an existing reply is dropped)."""
    messages = record.messages
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return [dict(m) for m in messages]


def write_parquet(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Rows as one parquet file with a fixed column order (also when there are no rows); a column no row has
    (`refusal` in rows of an older version or another source) is written as nulls."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows) if rows else pa.table({c: pa.array([], pa.string()) for c in columns})
    for column in columns:
        if column not in table.column_names:
            table = table.append_column(column, pa.nulls(table.num_rows, pa.string()))
    table = table.select(columns)
    tmp = path.with_name(f".{path.name}.tmp-{writer_id()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def write_candidates(folder: Path, instructions: list[Record], rows: list[dict], rejects: list[dict]) -> dict:
    """Write the candidates table files; returns the metrics every candidates stage reports."""
    save_canonical(instructions, folder / "instructions.jsonl")
    write_parquet(folder / "candidates.parquet", rows, CANDIDATE_COLUMNS)
    write_jsonl(folder / "rejects.jsonl", rejects)
    per_generator = Counter(r["generator"] for r in rows)
    metrics = {"instructions": len(instructions), "candidates": len(rows), "candidates_rejected": len(rejects)}
    metrics.update({f"candidates/{g}": n for g, n in sorted(per_generator.items())})
    return metrics


# ------------------------------------------------------------------------------------------- stage: generate
def generation_rows(backend, generator: GeneratorConfig, records: list[Record], shard: int, shard_size: int,
                    params: str) -> list[dict]:
    """Shard `shard` of a generator's answers: one row per instruction."""
    from models.generation import derive_seed

    part = records[shard * shard_size:(shard + 1) * shard_size]
    answers = backend.generate([instruction_messages(r) for r in part], seed=derive_seed(generator.sampling.seed, shard))
    return [{"instruction_id": r.id, "generator": generator.name, "response": a.text, "params": params,
             "seed": a.seed, "prompt_tokens": a.prompt_tokens, "response_tokens": a.response_tokens,
             "finish_reason": a.finish_reason, "refusal": a.refusal} for r, a in zip(part, answers)]


# One generator backend per worker process: a vLLM engine reserves most of the GPU, so loading the next
# generator (GRAPE runs them one after another) closes the last one first.
_WORKER_GENERATORS = WorkerCache(size=1)


def _worker_generator(generator_json: str):
    """The generator backend of a worker process, per model files (`model_files_stamp`; its shards share the
    loaded model), for a `with` block."""
    from models.generation import make_generator
    from tasks.runner import model_files_stamp

    generator = GeneratorConfig.model_validate_json(generator_json)
    tokenizer = generator.endpoint.tokenizer if generator.endpoint is not None else None
    return _WORKER_GENERATORS.use(generator_json, model_files_stamp(generator.model, tokenizer),
                                  lambda: make_generator(generator))


def generation_shard_at(index: int, records_path: str, generator: GeneratorConfig, shard_size: int) -> list[dict]:
    """Shard `index` of a generate stage, computed in whatever process the task runner chose."""
    from models.generation import generation_params
    from tasks.runner import worker_records

    params = json.dumps(generation_params(generator), sort_keys=True)
    with _worker_generator(generator.model_dump_json()) as backend:
        return generation_rows(backend, generator, worker_records(records_path), index, shard_size, params)


def generate_candidates(records_out: StageOutput, generator: GeneratorConfig, shard_size: int = 64,
                        progress: bool = True) -> StageOutput:
    """Stage `generate`: one generator's answers to every instruction, in resumable shards."""
    from models.generation import (CONTEXT_OVERFLOW, SERVER_REFUSED, SPECIAL_TOKEN, TEMPLATE_REFUSED,
                                   generation_params, make_generator)

    def body(folder: Path) -> dict:
        from tqdm.auto import tqdm

        records = load_canonical(records_out.file("records.jsonl"))
        table = ShardedTable(folder / "shards")
        n_shards = (len(records) + shard_size - 1) // shard_size
        done = table.done()
        todo = [s for s in range(n_shards) if s not in done]
        params = json.dumps(generation_params(generator), sort_keys=True)
        if todo and generator.scale_out is not None:
            from tasks.runner import map_shards

            map_shards(generation_shard_at, n_shards, table, generator.scale_out, name=f"generate-{generator.name}",
                       progress=progress, records_path=str(records_out.file("records.jsonl")),
                       generator=generator, shard_size=shard_size)
        elif todo:
            backend = make_generator(generator)
            try:
                for shard in tqdm(todo, desc=f"generate {generator.name} (shards)", disable=not progress):
                    table.write(shard, generation_rows(backend, generator, records, shard, shard_size, params))
            finally:
                backend.close()
        rows = table.read()
        columns = ["instruction_id", "generator", "response", "params", "seed", "prompt_tokens",
                   "response_tokens", "finish_reason", "refusal"]
        write_parquet(folder / "generated.parquet", rows, columns)
        finish = Counter(r["finish_reason"] for r in rows)
        lengths = [r["response_tokens"] for r in rows if r["response_tokens"] is not None]
        metrics = {"instructions": len(records), "responses": len(rows),
                   "empty_responses": sum(1 for r in rows if not r["response"].strip()),
                   "shards": n_shards, "shards_resumed": len(done),
                   "mean_response_tokens": sum(lengths) / len(lengths) if lengths else 0.0}
        metrics.update({f"finish_reason/{k}": v for k, v in sorted(finish.items())})
        overflow, refused = finish.get(CONTEXT_OVERFLOW, 0), finish.get(TEMPLATE_REFUSED, 0)
        server_refusals = [r["refusal"] for r in rows if r["finish_reason"] == SERVER_REFUSED]
        held = finish.get(SPECIAL_TOKEN, 0)
        not_generated = overflow + refused + held + len(server_refusals)
        summary = (f"Generator **{generator.name}** ({generator.backend}) answered {len(rows) - not_generated} "
                   f"of {len(records)} instructions in {n_shards} shards ({len(done)} resumed from an earlier run); "
                   f"finish reasons {dict(finish)}.")
        if overflow:
            summary += (f" {overflow} conversations do not fit the generator's context with max_new_tokens and got "
                        f"no answer (finish_reason {CONTEXT_OVERFLOW}).")
        if refused:
            summary += (f" {refused} conversations are refused by the generator's chat template and got no answer "
                        f"(finish_reason {TEMPLATE_REFUSED}).")
        if server_refusals:
            summary += (f" {len(server_refusals)} conversations were refused by the server and got no answer "
                        f"(finish_reason {SERVER_REFUSED}; each candidate's `refusal` and grape-fit's rejects say "
                        f"why); the first: {server_refusals[0]}")
        if held:
            summary += (f" {held} conversations hold one of the generator's special tokens as text (its tokenizer "
                        f"would read the string as that control token) and got no answer (finish_reason "
                        f"{SPECIAL_TOKEN}): remove those strings from the data, or use a generator whose tokenizer "
                        "does not have them.")
        return {"metrics": metrics, "params": {"generation": params}, "summary": summary}

    config = {"generator": generator, "shard_size": shard_size}
    return run_stage(f"generate-{generator.name}", config, [records_out], body, digest_of=["generated.parquet"])


generate_candidates_task = stage_task(generate_candidates, name="generate")


# ----------------------------------------------------------------------------------------- stage: candidates
def collect_candidates(records_out: StageOutput, generated: list[StageOutput],
                       failures: dict[str, str] | None = None) -> StageOutput:
    """Stage `candidates`: merge the generators that finished into one candidates table; record failed ones.

    candidate_index follows the order of `generated` (the recipe's generator order).
    """
    failures = dict(failures or {})

    def body(folder: Path) -> dict:
        records = load_canonical(records_out.file("records.jsonl"))
        by_instruction: dict[str, list[dict]] = {r.id: [] for r in records}
        for out in generated:
            for row in read_parquet(out.file("generated.parquet")):
                by_instruction[row["instruction_id"]].append(row)
        rows = []
        for record in records:
            for index, row in enumerate(by_instruction[record.id]):
                rows.append({**row, "candidate_index": index})
        metrics = write_candidates(folder, records, rows, [])
        metrics["generators"] = len(generated)
        metrics["generators_failed"] = len(failures)
        atomic_write_text(folder / "failed_generators.json", json.dumps(failures, indent=1, sort_keys=True))
        names = [o.stage for o in generated]
        summary = f"{len(rows)} candidates for {len(records)} instructions from {len(generated)} generators."
        if failures:
            summary += ("\n\n**Failed generators (not in this table):**\n\n" +
                        "\n".join(f"- `{name}`: {message}" for name, message in sorted(failures.items())))
        return {"metrics": metrics, "artifacts": ["failed_generators.json", "rejects.jsonl"], "summary": summary,
                "params": {"generator_stages": ",".join(names), "failed_generators": ",".join(sorted(failures))}}

    return run_stage("candidates", {"failures": failures}, [records_out, *generated], body,
                     digest_of=CANDIDATE_FILES)


collect_candidates_task = stage_task(collect_candidates, name="collect-candidates")
