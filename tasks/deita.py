"""Deita: complexity and quality scores, the evol score, conversation embeddings, and the diversity filter.

Stages (each content-addressed and resumable):
  `deita-complexity` / `deita-quality`: per-turn expected scores of every record (`scores.jsonl`, `rejects.jsonl`);
  `deita-embed`: one L2-normalised vector per record (`embeddings.npy`, `ids.txt`, `embedding-meta.json`);
  `select-deita`: rank by the chosen score and keep greedily unless too similar to a kept sample (`ranking.jsonl`
  and the subset files every selection writes).

The filter's definition is sequential: walk the candidates by score, descending (ties keep input order), and keep
one unless its cosine similarity to ANY already-kept sample is > tau; stop at the budget. `diversity_filter` is the
blocked implementation of that definition and returns exactly the selection of `diversity_filter_sequential`:
both compare in float32 and settle any similarity within `margin` of tau with the same exactly rounded float64
dot product, so rounding differences between a matrix product and a vector product cannot flip a decision.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from configs.deita import DeitaEmbeddingConfig, DeitaScorerConfig, DeitaSelection
from configs.errors import ScoringError
from tasks.data import Record, atomic_write_text, load_canonical, read_jsonl, write_jsonl
from tasks.select import SUBSET_FILES, write_subset
from tasks.store import ArrayShards, ShardedTable, StageOutput, run_stage, stage_task

EMBEDDING_TEMPLATE = "vicuna_v1.1"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


# ------------------------------------------------------------------------------------------------ scores
def evol_scores(complexity: Sequence[Sequence[float]] | None, quality: Sequence[Sequence[float]] | None,
                variant: str = "evol") -> np.ndarray:
    """Per-record ranking score from per-turn scores: 'evol' = sum_t c_t * q_t, else the sum of one dimension."""
    if variant == "evol":
        if complexity is None or quality is None:
            raise ValueError("the evol score needs both complexity and quality scores")
        out = []
        for i, (c, q) in enumerate(zip(complexity, quality, strict=True)):
            if len(c) != len(q):
                raise ScoringError(f"record {i}: {len(c)} complexity scores but {len(q)} quality scores")
            out.append(sum(a * b for a, b in zip(c, q)))
        return np.asarray(out, dtype=np.float64)
    per_turn = {"complexity": complexity, "quality": quality}.get(variant)
    if per_turn is None:
        raise ValueError(f"score variant {variant!r} needs its scores (or is unknown: evol, complexity, quality)")
    return np.asarray([sum(t) for t in per_turn], dtype=np.float64)


def ranking_order(scores: np.ndarray) -> np.ndarray:
    """Indices by score, descending; equal scores keep input order (a stable sort, so reruns agree)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ScoringError(f"non-finite ranking scores at {np.nonzero(~np.isfinite(scores))[0][:5].tolist()}")
    return np.argsort(-scores, kind="stable")


# -------------------------------------------------------------------------------------- diversity filter
@dataclass
class FilterResult:
    selected: np.ndarray  # row indices of the kept samples, in the order they were kept
    examined: int         # candidates looked at before the budget was reached (all of them otherwise)

    @property
    def rejected(self) -> int:
        """Candidates the filter looked at and refused as too similar to a kept sample."""
        return self.examined - len(self.selected)


def unit_rows(x, out: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; into `out` when given). Row-wise, so a block gives the same rows as
    the whole matrix: squared norms are summed in float64, each row is multiplied by its float32 reciprocal."""
    x32 = np.asarray(x, dtype=np.float32)
    # float32 sums (row-wise, 5x faster than float64 ones): the norm is off by ~1e-7 relative, which only rescales a
    # vector by as much; every comparison in the filter is made between these very vectors
    norms = np.sqrt(np.einsum("ij,ij->i", x32, x32, dtype=np.float32))[:, None]
    if (norms == 0).any() or not np.isfinite(norms).all():
        raise ScoringError("an embedding is zero or non-finite: cosine similarity is undefined")
    return np.multiply(x32, np.float32(1.0) / norms, out=out)


def exact_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Dot product of two float32 vectors, correctly rounded: float32 x float32 products are exact in float64
    and `math.fsum` sums them exactly, so every caller gets the same number for the same pair."""
    return math.fsum((a.astype(np.float64) * b.astype(np.float64)).tolist())


def float32_margin(dim: int) -> float:
    """A bound on |float32 dot - exact dot| for unit vectors of this dimension (about dim x unit roundoff, x2)."""
    import torch

    reduced = torch.get_float32_matmul_precision() != "highest"  # TF32 / bf16 matmuls on GPU are far coarser
    return 2e-2 if reduced else max(1e-5, 2.0 * dim * 2.0 ** -24)


def _too_similar(sims: np.ndarray, vec: np.ndarray, other, tau: float, margin: float) -> bool:
    """Is any similarity > tau? float32 `sims` decide unless within `margin` of tau; those are recomputed exactly
    against `other(j)`, the j-th compared vector."""
    if sims.size == 0:
        return False
    if sims.max() > tau + margin:
        return True
    return any(exact_similarity(vec, other(j)) > tau for j in np.nonzero(sims >= tau - margin)[0])


def _examined(n_candidates: int, n_selected: int, count: int, position_of_last: int) -> int:
    """The sequential walk stops right after the budget-filling sample; otherwise it looks at every candidate."""
    return position_of_last + 1 if n_selected >= count else n_candidates


def diversity_filter_sequential(embeddings, order: Sequence[int], tau: float, count: int) -> FilterResult:
    """The definition, one candidate at a time: the reference the fast filter must match exactly."""
    order = np.asarray(order, dtype=np.int64)
    dim = embeddings.shape[1]
    margin = float32_margin(dim)
    count = min(count, len(order))
    kept_vectors = np.empty((count, dim), dtype=np.float32)
    selected: list[int] = []
    last = -1
    for position, index in enumerate(order):
        if len(selected) >= count:
            break
        vec = unit_rows(embeddings[index:index + 1])[0]
        kept = kept_vectors[:len(selected)]
        if not _too_similar(kept @ vec, vec, kept.__getitem__, tau, margin):
            kept_vectors[len(selected)] = vec
            selected.append(int(index))
            last = position
    return FilterResult(np.asarray(selected, dtype=np.int64), _examined(len(order), len(selected), count, last))


def bfloat16_margin(dim: int) -> float:
    """A bound on |bfloat16 dot - exact dot| for unit vectors: each input rounded to bfloat16 (unit roundoff
    u = 2^-8, twice), the float32 accumulation (dim x 2^-24, x2) and the bfloat16 output (u once more)."""
    u = 2.0 ** -8
    return 3 * u + u * u + dim * 2.0 ** -23


def screen_dtype(device: str, precision: str = "auto"):
    """The dtype of the filter's big matrix products. bfloat16 on a CPU with native bfloat16 matrix units (AMX,
    AVX512-BF16: about 4x the float32 rate here); float32 elsewhere. Either way the selection is exact: a
    similarity within the dtype's margin of tau is recomputed in float32, then exactly."""
    import torch

    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"screen precision {precision!r}: use auto, float32 or bfloat16")
    if precision == "bfloat16" and device != "cpu":
        # cuBLAS may reduce bfloat16 products in reduced precision, which the margin does not bound
        raise ValueError("the bfloat16 screen is for CPUs; on CUDA the filter's float32 products are fast already")
    native = device == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if precision == "bfloat16" or (precision == "auto" and native) else torch.float32


SCREEN_PIECE = 2048  # kept rows per screen product
SCREEN_SUB = 512     # block rows per product when a block is compared with itself (its lower triangle only)


def _rows_too_similar(rows: np.ndarray, block_low, kept_low, kept_rows, n_kept: int, piece: int, tau: float,
                      margin: float, margin32: float) -> np.ndarray:
    """Per block row: is its similarity to any of the first `n_kept` kept rows > tau?

    `rows` are the block's float32 unit rows, `block_low` the same in the screen's dtype, `kept_low` the kept
    rows in that dtype and `kept_rows(columns)` gives kept rows in float32. The screen multiplies `block_low` by
    `kept_low` `piece` kept rows at a time (the tail in power-of-two pieces, see `_piece_width`) from the
    zero-padded kept buffer, so the products have few distinct shapes (oneDNN compiles a kernel per shape, ~20 ms
    each). A row is decided by its maximum unless that lies within `margin` of tau; such rows look at their pairs
    near tau in float32, then exactly.
    """
    import torch

    row_max = torch.full((len(rows),), -2.0, device=block_low.device)
    pairs_r, pairs_c = [], []
    c0 = 0
    while c0 < n_kept:
        width = _piece_width(n_kept - c0, piece)
        sims = block_low @ kept_low[c0:c0 + width].T
        if n_kept - c0 < width:
            sims = sims[:, :n_kept - c0]  # the padding columns are not kept samples
        chunk_max = sims.amax(dim=1).float()
        row_max = torch.maximum(row_max, chunk_max)
        unsure = torch.nonzero((chunk_max >= tau - margin) & (chunk_max <= tau + margin)).flatten()
        if len(unsure):
            r, c = torch.nonzero(sims[unsure] >= tau - margin, as_tuple=True)
            pairs_r.append(unsure[r])
            pairs_c.append(c + c0)
        c0 += width
    too_similar = (row_max > tau + margin).cpu().numpy()
    if not pairs_r:
        return too_similar
    r, c = torch.cat(pairs_r), torch.cat(pairs_c)
    r, c = r.cpu().numpy(), c.cpu().numpy()
    r, c = r[~too_similar[r]], c[~too_similar[r]]
    kept32 = kept_rows(c)
    sims32 = np.einsum("ij,ij->i", rows[r], kept32)  # float32: within margin32 of the exact value
    too_similar[r[sims32 > tau + margin32]] = True
    band = np.nonzero((sims32 >= tau - margin32) & (sims32 <= tau + margin32) & ~too_similar[r])[0]
    for p in band.tolist():  # float32 cannot tell: the exact dot decides
        if not too_similar[r[p]]:
            too_similar[r[p]] = exact_similarity(rows[r[p]], kept32[p]) > tau
    return too_similar


def _torch_rows(embeddings):
    """A tensor sharing `embeddings`' memory (a memory map stays one) when it is a C-contiguous float32 array."""
    import warnings

    import torch

    array = np.asarray(embeddings)
    if array.dtype != np.float32 or not array.flags.c_contiguous:
        return None
    with warnings.catch_warnings():  # a read-only memory map: the filter only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _piece_width(remaining: int, piece: int, smallest: int = 128) -> int:
    """Kept rows for the next screen product: a full `piece`, or for the tail the largest power of two (from
    `smallest`) it fills, rounding a last sliver up: few distinct shapes, little padding computed."""
    if remaining >= piece:
        return piece
    width = smallest
    while width * 2 <= remaining:
        width *= 2
    return width if remaining >= smallest else min(smallest, piece)


def _next_block_size(block_size: int, wanted: int, examined: int, kept: int) -> int:
    """Candidates for the next block: `block_size`, or near the budget what it still needs at the keep rate so
    far (plus a tenth) rounded up to a power of two from 64, so little is computed past the budget and the
    product shapes repeat."""
    if kept == 0:
        return block_size
    need = int(wanted * examined / kept * 1.1) + 1
    size = 64
    while size < need and size < block_size:
        size *= 2
    return min(size, block_size)


def diversity_filter(embeddings, order: Sequence[int], tau: float, count: int, block_size: int = 1024,
                     device: str | None = None, max_chunk_bytes: int = 256 << 20, progress: bool = False,
                     precision: str = "auto") -> FilterResult:
    """The same selection as `diversity_filter_sequential`, computed a block of candidates at a time.

    Per block: matrix products against the kept samples, a fixed number of kept columns at a time (memory stays
    bounded by the block, `max_chunk_bytes` and the kept set, never n x n), reduced to each row's maximum (see
    `_rows_too_similar`); then the block's survivors are settled among themselves sequentially on the block's
    own similarity matrix. The products run in `screen_dtype` and only similarities near tau are recomputed, so
    the selection is exact whatever the precision. `embeddings` may be a memory-mapped array: only the rows of
    the current block are read.
    """
    import torch

    order = np.asarray(order, dtype=np.int64)
    dim = embeddings.shape[1]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    low = screen_dtype(device, precision)
    margin32 = float32_margin(dim)
    margin = bfloat16_margin(dim) if low == torch.bfloat16 else margin32
    count = min(count, len(order))
    piece = max(1, min(SCREEN_PIECE, max_chunk_bytes // (4 * block_size)))
    sub = min(block_size, SCREEN_SUB)
    upper = torch.ones((sub, sub), dtype=torch.bool, device=device).triu()  # diagonal and above
    capacity = -(-count // piece) * piece + 128  # room for a padded last sliver (see _piece_width)
    kept_low = torch.zeros((capacity, dim), dtype=low, device=device)  # the kept rows, as the screen reads them

    def kept_rows(columns: np.ndarray) -> np.ndarray:
        """float32 unit rows of kept samples, for the few pairs the screen leaves open."""
        if low == torch.float32:
            return kept_low[torch.from_numpy(columns).to(device)].cpu().numpy()
        ids = np.asarray(selected, dtype=np.int64)[columns]
        by_storage = np.argsort(ids, kind="stable")
        out = np.empty((len(ids), dim), dtype=np.float32)
        out[by_storage] = unit_rows(embeddings[ids[by_storage]])  # the very rows the block held (row-wise)
        return out

    selected: list[int] = []
    last = -1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=count, desc="diversity filter (kept)", unit="sample")
    source = _torch_rows(embeddings)
    buffer = np.empty((min(block_size, len(order)), dim), dtype=np.float32)  # reused: fresh pages cost faults
    start = 0
    while start < len(order) and len(selected) < count:
        size = _next_block_size(block_size, count - len(selected), start, len(selected))
        block_index = order[start:start + size]
        rows = buffer[:len(block_index)]
        if source is not None:  # torch's row gather is ~5x numpy's, memory map or not
            torch.index_select(source, 0, torch.from_numpy(block_index), out=torch.from_numpy(rows))
        else:
            np.take(embeddings, block_index, axis=0, out=rows)
        unit_rows(rows, out=rows)
        block_low = torch.from_numpy(rows).to(device=device, dtype=low)  # on CPU in float32: a view of `rows`
        n_kept = len(selected)

        # 1. block vs everything kept before this block
        rejected = (_rows_too_similar(rows, block_low, kept_low, kept_rows, n_kept, piece, tau, margin, margin32)
                    if n_kept else np.zeros(len(rows), dtype=bool))

        # 2. survivors among themselves, in ranking order: only pairs that may exceed tau can conflict, so the
        # block's own products (lower triangle, `sub` rows at a time: repeated shapes) just list those pairs.
        pairs: dict[int, list[int]] = {}
        for i0 in range(0, len(rows), sub):
            here = block_low[i0:i0 + sub]
            sims = here @ block_low[:i0 + len(here)].T  # against the block's rows up to this sub-block's end
            sims[:, i0:].masked_fill_(upper[:len(here), :len(here)], -2.0)  # a row is compared to earlier rows only
            hit = torch.nonzero(sims.amax(dim=1).float() >= tau - margin).flatten()  # rows with a pair near tau
            if len(hit):
                r, c = torch.nonzero(sims[hit] >= tau - margin, as_tuple=True)
                for i, j in zip((hit[r] + i0).tolist(), c.tolist()):
                    if not rejected[i] and not rejected[j]:
                        pairs.setdefault(i, []).append(j)
        keep = ~rejected
        for s in sorted(pairs):
            earlier = [j for j in pairs[s] if keep[j]]  # decided before s, as in the sequential walk
            if earlier and _too_similar(rows[earlier] @ rows[s], rows[s], lambda j: rows[earlier[j]], tau, margin32):
                keep[s] = False
        survivors = np.nonzero(keep)[0]
        new = survivors[:count - len(selected)]  # block rows kept, up to the budget
        if len(new):
            selected.extend(block_index[new].tolist())
            last = start + int(new[-1])
            kept_low[n_kept:n_kept + len(new)] = block_low[torch.from_numpy(new).to(device)]
            if bar is not None:
                bar.update(len(new))
        start += len(block_index)
    if bar is not None:
        bar.close()
    return FilterResult(np.asarray(selected, dtype=np.int64), _examined(len(order), len(selected), count, last))


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


def dimension_rows(scorer, records: list[Record]) -> list[dict]:
    """Per-turn expected scores of `records` ({id, scores, reject}); a too-long prompt rejects its record."""
    encoded = [scorer.encode([scorer.prompt(u, a) for u, a in conversation_turns(r)]) for r in records]
    rows, flat, owners = [], [], []
    for r, prompts in zip(records, encoded):
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
        values = scorer.score_encoded(flat)
        for owner, value in zip(owners, values.tolist()):
            rows[owner]["scores"].append(float(value))
    return rows


@functools.lru_cache(maxsize=2)
def _worker_scorer(dimension: str, scorer_json: str):
    """One loaded Deita scorer per worker process and dimension."""
    from models.deita import DeitaScorer

    config = DeitaScorerConfig.model_validate_json(scorer_json)
    return DeitaScorer.load(config.model, dimension, config.kind, config.batch_size, config.max_prompt_tokens)


def dimension_shard_at(index: int, records_path: str, dimension: str, scorer_config: DeitaScorerConfig) -> list[dict]:
    """Shard `index` of a deita-<dimension> stage, computed in whatever process the task runner chose."""
    from tasks.runner import worker_records

    size = scorer_config.shard_size
    scorer = _worker_scorer(dimension, scorer_config.model_dump_json())
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
        todo = [s for s in range(n_shards) if s not in table.done()]
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
        turn_scores = np.asarray([v for row in scored for v in row["scores"]], dtype=np.float64)
        artifacts = ["rejects.jsonl", "scores.jsonl"]
        metrics = {"records": len(records), "scored": len(scored), "rejected": len(rejects), "turns": len(turn_scores)}
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
def embed_shard(model, tokenizer, records: list[Record], embedding: DeitaEmbeddingConfig) -> np.ndarray:
    from models.embeddings import embed_texts

    eos = tokenizer.eos_token or ""
    return embed_texts(model, tokenizer, [vicuna_text(r, eos) for r in records], pooling=embedding.pooling,
                       batch_size=embedding.batch_size, normalize=True, max_length=embedding.max_length)


def embed_shard_at(index: int, records_path: str, embedding: DeitaEmbeddingConfig) -> np.ndarray:
    """Shard `index` of a deita-embed stage, computed in whatever process the task runner chose."""
    from tasks.runner import worker_model, worker_records

    model, tokenizer = worker_model(embedding.model.model_dump_json())
    size = embedding.shard_size
    return embed_shard(model, tokenizer, worker_records(records_path)[index * size:(index + 1) * size], embedding)


def embed_records(records_out: StageOutput, embedding: DeitaEmbeddingConfig, progress: bool = True) -> StageOutput:
    """Stage `deita-embed`: one L2-normalised vector per record, in record order, shard by shard.

    Output: `embeddings.npy` (float32 [n, hidden], memory-mappable), `ids.txt`, `embedding-meta.json`.
    """
    from models.loading import load_model

    def body(folder: Path) -> dict:
        import os

        records = load_canonical(records_out.file("records.jsonl"))
        shards = ArrayShards(folder / "shards")
        size = embedding.shard_size
        n_shards = math.ceil(len(records) / size)
        final = folder / "embeddings.npy"
        if not final.exists():  # written last and atomically: present means every shard went into it
            todo = [s for s in range(n_shards) if s not in shards.done()]
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
            dim = shards.read_array(0).shape[1] if n_shards else 0
            tmp = folder / f".embeddings.tmp-{os.getpid()}.npy"
            matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(records), dim))
            for shard in range(n_shards):
                matrix[shard * size:(shard + 1) * size] = shards.read_array(shard)
            matrix.flush()
            del matrix
            os.replace(tmp, final)
        dim = int(np.load(final, mmap_mode="r").shape[1])
        for shard in range(n_shards):
            shards.shard_path(shard).unlink(missing_ok=True)
        atomic_write_text(folder / "ids.txt", "".join(r.id + "\n" for r in records))
        meta = {"model": embedding.model.name_or_path, "pooling": embedding.pooling, "template": EMBEDDING_TEMPLATE,
                "max_length": embedding.max_length, "dim": dim, "normalized": True, "rows": len(records)}
        atomic_write_text(folder / "embedding-meta.json", json.dumps(meta, indent=1))
        return {"metrics": {"records": len(records), "dim": dim},
                "params": {"embedding_model": embedding.model.name_or_path, "embedding_pooling": embedding.pooling,
                           "embedding_template": EMBEDDING_TEMPLATE},
                "artifacts": ["embedding-meta.json"],
                "summary": f"Embedded **{len(records)}** conversations with `{embedding.model.name_or_path}` "
                           f"({embedding.pooling} pooling, {EMBEDDING_TEMPLATE} template, dim {dim})."}

    key_config = embedding.model_dump(mode="json", exclude={"batch_size", "scale_out"})
    return run_stage("deita-embed", {"embedding": key_config, "template": EMBEDDING_TEMPLATE}, [records_out], body,
                     digest_of=["embeddings.npy", "ids.txt"])


# ------------------------------------------------------------------------------------------ filter stage
def _per_turn(out: StageOutput | None) -> tuple[dict[str, list[float]], list[dict]]:
    if out is None:
        return {}, []
    scores = {row["id"]: row["scores"] for row in read_jsonl(out.file("scores.jsonl"))}
    return scores, read_jsonl(out.file("rejects.jsonl"))


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
        if ids != [r.id for r in records]:
            raise ValueError("the embeddings were computed for other records than these (ids.txt differs)")
        embeddings = np.load(embeddings_out.file("embeddings.npy"), mmap_mode="r")
        tables = [{"complexity": complexity, "quality": quality}[s] for s in needed]
        rows = [i for i, r in enumerate(records) if all(r.id in table for table in tables)]
        cand = [records[i] for i in rows]
        c_turns = [complexity[r.id] for r in cand] if complexity_out is not None else None
        q_turns = [quality[r.id] for r in cand] if quality_out is not None else None
        scores = evol_scores(c_turns, q_turns, selection.score)
        order = np.asarray(rows, dtype=np.int64)[ranking_order(scores)]
        count = selection.count(len(cand))
        device = None if selection.filter_device == "auto" else selection.filter_device
        result = diversity_filter(embeddings, order, selection.tau, count, selection.filter_block_size, device,
                                  progress=progress, precision=selection.filter_precision)

        score_of = dict(zip(rows, scores.tolist()))
        kept = set(result.selected.tolist())
        ranking = []
        for rank, i in enumerate(order.tolist()):
            status = "selected" if i in kept else ("rejected_similar" if rank < result.examined else "not_examined")
            ranking.append({"rank": rank, "id": records[i].id, "score": score_of[i], "status": status,
                            "complexity": complexity.get(records[i].id), "quality": quality.get(records[i].id)})
        write_jsonl(folder / "ranking.jsonl", ranking)
        write_jsonl(folder / "rejects.jsonl", rejects_c + rejects_q)
        fields = write_subset(records, [records[i].id for i in result.selected], folder, "deita", output_format)

        artifacts = ["ranking.jsonl", "rejects.jsonl"]
        if len(scores):
            selected_scores = [score_of[i] for i in result.selected.tolist()]
            cutoff = min(selected_scores) if selected_scores else None
            histogram(scores, folder / "score_hist.png", f"Deita {selection.score} score", f"{selection.score} score",
                      threshold=cutoff)
            artifacts.append("score_hist.png")
        if c_turns is not None and q_turns is not None and len(cand):
            scatter([v for t in c_turns for v in t], [v for t in q_turns for v in t], folder / "complexity_vs_quality.png",
                    "Deita complexity vs quality (per turn)", "complexity", "quality")
            artifacts.append("complexity_vs_quality.png")
        fields["artifacts"] = artifacts + fields["artifacts"]
        fields["metrics"].update({
            "candidates": len(cand), "unscored": len(records) - len(cand), "budget": count,
            "examined": result.examined, "rejected_similar": result.rejected,
            "not_examined": len(cand) - result.examined, "tau": selection.tau,
        })
        if len(result.selected):
            fields["metrics"]["selected_score_mean"] = float(np.mean([score_of[i] for i in result.selected.tolist()]))
        if len(scores):
            fields["metrics"]["candidate_score_mean"] = float(scores.mean())
        fields["params"] = {"score": selection.score, "tau": selection.tau, "budget": count}
        fields["summary"] = (
            f"Deita ({selection.score} score, tau {selection.tau}): kept **{len(result.selected)}** of {len(cand)} "
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
