"""IFD selection (Cherry v1 and Superfiltering v2), Cherry's pre-experience, and Superfiltering's diversity step.

Plain functions first (tested without Prefect), then the stages built on them:
- `cherry-instructions`: perplexity and mean-pooled embedding of every templated instruction (raw scorer);
- `cherry-pick`: KMeans on the embeddings, mid-perplexity band per cluster, an even stride -> pre-experience set;
- `cherry-sft`: the brief SFT of the scorer on that set (tasks.train.sft_train) -> the pre-experienced model;
- `select-cherry` / `select-superfilter`: IFD from the `score` stage, threshold, budget, subset (input order);
- `select-superfilter-d`: facility location over embeddings of the IFD-selected samples, to a second budget.

Definitions (REFERENCE.md): Cherry IFD = mean NLL(answer | prompt) / mean NLL(answer | direct text), a ratio of
mean losses; Superfiltering IFD = exp(L_cond) / exp(L_direct), a ratio of perplexities (computed as
exp(L_cond - L_direct): the same number without overflow). Both drop IFD above the threshold. Unlike the references,
samples that could not be scored never enter the ranking with a made-up 0; they are counted and listed in rejects.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from configs.errors import ConfigError, ScoringError
from configs.ifd import CherrySelection, DiversityConfig, IFDRule, PreExperienceConfig, ScoringConfig, SuperfilterSelection
from configs.schema import Budget
from models.special_tokens import (first_special_token, report_special_tokens, special_token_pattern,
                                   special_token_reason)
from tasks.data import Record, load_canonical, read_jsonl, to_format, write_jsonl
from tasks.score import STATUS_SCORED, STATUS_SKIPPED, read_scores, score_counts, scored_texts, skip_kind
from tasks.select import SUBSET_FILES, nothing_selected, write_subset
from tasks.store import StageOutput, atomic_write_text, portable_model_digest, run_stage, stage_task

IFDKind = Literal["cherry", "superfilter"]


# ------------------------------------------------------------------------------------------------ IFD maths
def ifd_value(kind: IFDKind, cond_mean_nll: float, direct_mean_nll: float) -> float:
    """Cherry: ratio of mean losses. Superfiltering: ratio of perplexities."""
    if kind == "cherry":
        if direct_mean_nll == 0:
            raise ScoringError("direct loss is exactly 0: Cherry's IFD (a ratio of losses) is undefined")
        return cond_mean_nll / direct_mean_nll
    if kind == "superfilter":
        return math.exp(cond_mean_nll - direct_mean_nll)
    raise ValueError(f"unknown IFD kind {kind!r}")


UNDEFINED_IFD = "direct loss is exactly 0 (Cherry's IFD, a ratio of losses, is undefined)"


def skip_undefined_ifd(rows: Sequence[dict[str, Any]], kind: IFDKind) -> list[dict[str, Any]]:
    """Score-table rows with Cherry's undefined ratios (a model certain of the answer alone: direct loss 0) turned
    into skipped rows with their reason, so one such sample is a counted reject instead of stopping the stage."""
    if kind != "cherry":
        return list(rows)
    return [{**r, "status": STATUS_SKIPPED, "reason": UNDEFINED_IFD}
            if r["status"] == STATUS_SCORED and r["direct_mean_nll"] == 0 else r for r in rows]


def ifd_scores(rows: Sequence[dict[str, Any]], kind: IFDKind) -> list[float | None]:
    """IFD per score-table row (None where the sample was not scored)."""
    return [ifd_value(kind, r["cond_mean_nll"], r["direct_mean_nll"]) if r["status"] == STATUS_SCORED else None
            for r in rows]


def passes_threshold(ifd: float, rule: IFDRule) -> bool:
    return ifd < rule.threshold if rule.strict else ifd <= rule.threshold


def select_by_ifd(ids: Sequence[str], ifd: Sequence[float | None], rule: IFDRule, budget: Budget) -> tuple[list[str], dict[str, float]]:
    """Top-IFD ids among those passing the threshold, returned in input order, and the counts behind them.

    The kept count is `budget.count(n)` with n = all samples (`share_of="all"`) or the samples left after the
    threshold (`"filtered"`), never more than are left. Ties keep input order.
    """
    passing = [i for i, v in enumerate(ifd) if v is not None and passes_threshold(v, rule)]
    scored = sum(v is not None for v in ifd)
    base = len(ids) if rule.share_of == "all" else len(passing)
    keep = min(budget.count(base), len(passing))
    ranked = sorted(passing, key=lambda i: (-ifd[i], i))[:keep]  # type: ignore[operator]
    chosen = set(ranked)
    counts = {"ifd_scored": scored, "dropped_above_threshold": scored - len(passing), "passing_threshold": len(passing),
              "share_base": base, "selected": keep}
    return [ids[i] for i in range(len(ids)) if i in chosen], counts


def why_ifd_kept_nothing(rows: Sequence[dict[str, Any]], ifd: Sequence[float | None], rule: IFDRule) -> str:
    """Which rule removed every sample (no IFD could be computed, or the threshold) and what to change."""
    values = [v for v in ifd if v is not None]
    if not values:
        reasons = Counter(skip_kind(r["reason"]) for r in rows if r["status"] != STATUS_SCORED)
        listed = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())
        return (f"no sample could be scored ({listed}; each is listed with its reason in the score stage's "
                "rejects.jsonl): fix those reasons, e.g. raise selection.scoring.max_length or set "
                "selection.scoring.overlong: truncate")
    lowest = min(values)
    kept = "below" if rule.strict else "at or below"
    return (f"the IFD threshold removed all {len(values)} scored samples (none has IFD {kept} "
            f"selection.rule.threshold {rule.threshold:g}; the lowest is {lowest:.4g}): raise the threshold above "
            f"{lowest:.4g}")


# --------------------------------------------------------------------------------------- Cherry pre-experience
def band_stride_pick(values: np.ndarray, per_cluster: int, low: float, high: float) -> np.ndarray:
    """Positions (into `values`, one cluster in dataset order) of Cherry's pre-experience picks for that cluster.

    As the authors' `data_by_cluster.py` does: a cluster smaller than `per_cluster` is taken whole; otherwise the
    members whose perplexity lies in the [low, high] percentile band, `per_cluster` of them at an even stride in
    dataset order (not in perplexity order), or the whole band when it is smaller.
    """
    positions = np.arange(len(values))
    if len(values) < per_cluster:
        return positions
    lo, hi = np.percentile(values, low), np.percentile(values, high)
    band = positions[(values >= lo) & (values <= hi)]
    if len(band) < per_cluster:
        return band
    return band[::len(band) // per_cluster][:per_cluster]


def pick_pre_experience(embeddings: np.ndarray, perplexities: np.ndarray,
                        config: PreExperienceConfig) -> tuple[list[int], np.ndarray]:
    """Cherry's pre-experience set: KMeans clusters, then mid-perplexity samples at an even stride in each.

    Returns the picked positions (sorted) and every instruction's cluster label (what the stage's cluster table
    and figure show)."""
    from sklearn.cluster import KMeans

    if len(embeddings) < config.n_clusters:
        raise ConfigError(f"pre_experience.n_clusters={config.n_clusters} but only {len(embeddings)} instructions "
                          "could be embedded; lower n_clusters")
    labels = KMeans(n_clusters=config.n_clusters, random_state=config.seed, n_init=config.n_init).fit_predict(embeddings)
    picked: list[int] = []
    for cluster in range(config.n_clusters):
        members = np.where(labels == cluster)[0]
        picked.extend(int(i) for i in members[band_stride_pick(perplexities[members], config.per_cluster, *config.band)])
    return sorted(picked), labels


# ------------------------------------------------------------------------------------ Superfiltering.D
def facility_kernel(x: np.ndarray, columns: np.ndarray, kernel: str) -> np.ndarray:
    """Similarities [len(x), len(columns)] of unit rows: 'euclidean' = exp(-||x_i - x_j|| / dimension), the
    authors' kernel (submodlib's dense euclidean metric, gamma = 1 / dimension); 'cosine' = x_i . x_j."""
    dots = x @ columns.T
    if kernel == "cosine":
        return dots
    if kernel == "euclidean":
        return np.exp(-np.sqrt(np.maximum(2.0 - 2.0 * dots, 0.0)) / x.shape[1])
    raise ValueError(f"unknown facility-location kernel {kernel!r}: expected 'euclidean' or 'cosine'")


def unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """The embeddings as float64 unit rows, the facility kernels' input; a zero row has no direction."""
    x = embeddings.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ScoringError("an embedding has zero norm: its direction (and so its similarity) is undefined")
    return x / norms


def facility_location(embeddings: np.ndarray, k: int, kernel: Literal["euclidean", "cosine"] = "euclidean",
                      chunk: int = 2048, max_kernel_bytes: int = 1 << 30) -> list[int]:
    """Greedy facility location: repeatedly add the sample that most raises sum_i max_{j in S} sim(i, j).

    Embeddings are L2-normalised first. Cover starts at 0 (an empty set covers nothing), so a negative cosine
    adds nothing. Ties go to the lowest index. Lazy evaluation, as the authors' submodlib LazyGreedy: a gain
    only shrinks as the set grows, so a candidate's last computed gain bounds its current one, and only the
    candidates that reach the top of the bounds are recomputed - the same choices as recomputing every gain on
    every step. The kernel is computed once when it fits `max_kernel_bytes`, else one column per recomputed
    gain (those columns can round differently from the stored kernel's, which may break an exact floating-point
    tie between two gains the other way). Returns indices in the order chosen.
    """
    import heapq

    x = unit_rows(embeddings)
    n = len(x)
    full = None
    if n * n * 8 <= max_kernel_bytes:
        full = np.concatenate([facility_kernel(x, x[start:start + chunk], kernel) for start in range(0, n, chunk)],
                              axis=1)
    cover = np.zeros(n)

    def column(j: int) -> np.ndarray:
        return full[:, j] if full is not None else facility_kernel(x, x[j:j + 1], kernel)[:, 0]

    def gain(j: int) -> float:  # every gain that decides a choice is computed by this one function
        return float(np.maximum(column(j) - cover, 0).sum())

    # first bounds from whole blocks, raised a little so another summation order can never put them below a gain
    heap: list[tuple[float, int, int]] = []
    for start in range(0, n, chunk):
        block = full[:, start:start + chunk] if full is not None else facility_kernel(x, x[start:start + chunk], kernel)
        sums = np.maximum(block, 0).sum(axis=0)
        heap += [(-(s * (1 + 1e-9) + 1e-12), start + i, -1) for i, s in enumerate(sums.tolist())]
    heapq.heapify(heap)
    chosen: list[int] = []
    for step in range(min(k, n)):
        while True:  # (-value, index, step it was computed at): a fresh entry on top beats every bound below it
            _, j, when = heapq.heappop(heap)
            if when == step:
                break
            heapq.heappush(heap, (-gain(j), j, step))
        chosen.append(j)
        cover = np.maximum(cover, column(j))
    return chosen


# ------------------------------------------------------------------------------------------------- stages
def _model_label(out: StageOutput) -> str:
    return str(out.params.get("scorer", ""))


SINGLE_TOKEN = "instruction has a single token: no perplexity"


def _profile_reject(held: tuple[str, str] | None, request) -> str:
    """Why an instruction is not profiled ("" when it is): it holds a special token's text, or has one token."""
    if held:
        return special_token_reason(held[1], held[0])
    return "" if request.n_targets > 0 else SINGLE_TOKEN


def profile_shard(model, tokenizer, records: Sequence[Record], scoring: ScoringConfig,
                  pre: PreExperienceConfig) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Rows ({id, perplexity, reject}) and the mean last-hidden-state embeddings (of the rows without a reject,
    in order) of some records' templated instructions. An instruction (or input) holding one of the scorer's
    special tokens as text is a reject, never tokenized."""
    from models.embeddings import embed_texts
    from models.likelihood import score_requests
    from models.templates import instruction_request, instruction_text

    fields = [r.alpaca_fields() for r in records]
    pattern = special_token_pattern(tokenizer)
    held = [first_special_token(scored_texts(r, output=False), pattern) for r in records]
    requests = [None if hit else instruction_request(scoring.template, tokenizer, ins, inp, scoring.max_length)
                for hit, (ins, inp, _) in zip(held, fields)]
    usable = [i for i, req in enumerate(requests) if req is not None and req.n_targets > 0]
    rows = [{"id": r.id, "perplexity": None, "reject": _profile_reject(hit, req)}
            for r, hit, req in zip(records, held, requests)]
    if not usable:
        return rows, np.zeros((0, model.config.hidden_size), dtype=np.float32)
    scores = score_requests(model, [requests[i] for i in usable], batch_size=scoring.batch_size,
                            pad_id=int(tokenizer.pad_token_id or 0), max_batch_tokens=scoring.max_batch_tokens)
    for i, score in zip(usable, scores):
        rows[i]["perplexity"] = math.exp(score.mean_nll)
    texts = [instruction_text(scoring.template, tokenizer, *fields[i][:2]) for i in usable]
    # The tokens whose perplexity was just measured (the reference takes both from one pass): the reference
    # templates get the tokenizer's special tokens as its encode adds them; a chat template writes its own.
    embeddings = embed_texts(model, tokenizer, texts, pooling="mean", batch_size=pre.embed_batch_size, normalize=False,
                             max_length=scoring.max_length, add_special_tokens=scoring.template != "chat")
    return rows, np.asarray(embeddings, dtype=np.float32)


def profile_shard_at(index: int, records_path: str, scoring: ScoringConfig,
                     pre: PreExperienceConfig) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Shard `index` of a cherry-instructions stage, in whatever process the task runner chose."""
    from tasks.runner import worker_model, worker_records

    size = scoring.shard_size
    with worker_model(scoring.scorer.model_dump_json()) as (model, tokenizer):
        return profile_shard(model, tokenizer, worker_records(records_path)[index * size:(index + 1) * size], scoring,
                             pre)


def instruction_profile(records_out: StageOutput, scoring: ScoringConfig, pre: PreExperienceConfig,
                        progress: bool = True) -> StageOutput:
    """Stage `cherry-instructions`: per instruction, perplexity (whole text) and the mean of its last hidden state.

    Shard by shard (`scoring.shard_size` records; on `scoring.scale_out` workers when set): a killed run resumes at
    the first unfinished shard. Output: `embeddings.npy` (rows of the profiled instructions, in record order),
    `perplexity.jsonl`, `rejects.jsonl`.
    """
    from tasks.store import ArrayShards, ShardedTable

    def body(folder: Path) -> dict:
        records = load_canonical(records_out.file("records.jsonl"))
        # one folder per table: .npy files beside the parquet shards would break reading them as a dataset
        table, arrays = ShardedTable(folder / "shards"), ArrayShards(folder / "embedding-shards", prefix="embeddings")
        size = scoring.shard_size
        n_shards = math.ceil(len(records) / size)

        def write(index: int, result: tuple[list[dict[str, Any]], np.ndarray]) -> None:
            arrays.write_array(index, result[1])  # the table's manifest entry marks the shard done: written last
            table.write(index, result[0])

        finished = table.done() & arrays.done()
        todo = [s for s in range(n_shards) if s not in finished]
        if todo and scoring.scale_out is not None:
            from tasks.runner import map_shards

            map_shards(profile_shard_at, n_shards, table, scoring.scale_out, name="cherry-instructions",
                       progress=progress, write=write, records_path=str(records_out.file("records.jsonl")),
                       scoring=scoring, pre=pre)
        elif todo:
            from tqdm.auto import tqdm

            from models.loading import load_model

            model, tokenizer = load_model(scoring.scorer)
            for shard in tqdm(todo, desc="cherry instructions (shards)", unit="shard", disable=not progress):
                write(shard, profile_shard(model, tokenizer, records[shard * size:(shard + 1) * size], scoring, pre))
        rows = table.read()
        arrays.verified()
        embeddings = np.concatenate([arrays.read_array(s) for s in range(n_shards)]) if n_shards else np.zeros((0, 0))
        np.save(folder / "embeddings.npy", embeddings.astype(np.float32))
        by_id = {r.id: r for r in records}
        write_jsonl(folder / "perplexity.jsonl", ({"id": row["id"], "perplexity": row["perplexity"]}
                                                  for row in rows if not row["reject"]))
        rejects = [{"id": row["id"], "location": by_id[row["id"]].location, "reason": row["reject"]}
                   for row in rows if row["reject"]]
        write_jsonl(folder / "rejects.jsonl", rejects)
        report_special_tokens("cherry-instructions", (r["reason"] for r in rejects), len(rows), "instructions",
                              folder / "rejects.jsonl")
        profiled = len(rows) - len(rejects)
        metrics = {"instructions": len(records), "profiled": profiled, "skipped": len(rejects)}
        kinds = Counter(skip_kind(r["reason"]) for r in rejects)
        metrics.update({f"skipped[{kind}]": n for kind, n in sorted(kinds.items())})
        return {"metrics": metrics,
                "params": {"scorer": scoring.scorer.name_or_path, "template": scoring.template},
                "artifacts": ["rejects.jsonl"],
                "summary": f"Profiled **{profiled}** of {len(records)} instructions (perplexity + mean embedding)."}

    return run_stage("cherry-instructions", {"scoring": scoring, "embed_batch_size": pre.embed_batch_size},
                     [records_out], body, digest_of=["embeddings.npy", "perplexity.jsonl"])


PRE_EXPERIENCE_TRAIN = "pre_experience.train.jsonl"
CLUSTERS = "pre_experience_clusters.jsonl"


def pre_experience_rows(records: list[Record], template: str) -> list[dict]:
    """Training rows of the pre-experience set in the format IFD is then scored in: the reference templates'
    text as prompt + completion (the authors train with Stanford Alpaca's script on that text, loss on the
    output), or chat `messages` for the chat template."""
    from models.templates import prompt_text

    if template == "chat":
        return [to_format(r, "messages") for r in records]
    rows = []
    for r in records:
        instruction, input_text, output = r.alpaca_fields()
        rows.append({"prompt": prompt_text(template, None, instruction, input_text), "completion": output})
    return rows


def pre_experience_pick(records_out: StageOutput, profile_out: StageOutput, pre: PreExperienceConfig,
                        template: str = "wiz") -> StageOutput:
    """Stage `cherry-pick`: the pre-experience set as `pre_experience.train.jsonl` (+ ids), ready for SFT in the
    scoring `template`'s format."""

    def body(folder: Path) -> dict:
        from tasks.plots import pre_experience_figure

        records = {r.id: r for r in load_canonical(records_out.file("records.jsonl"))}
        ppl_rows = read_jsonl(profile_out.file("perplexity.jsonl"))
        emb = np.load(profile_out.file("embeddings.npy"))
        ppl = np.array([row["perplexity"] for row in ppl_rows], dtype=np.float64)
        picked, labels = pick_pre_experience(emb, ppl, pre)
        ids = [ppl_rows[i]["id"] for i in picked]
        atomic_write_text(folder / "pre_experience_ids.txt", "".join(i + "\n" for i in ids))
        write_jsonl(folder / PRE_EXPERIENCE_TRAIN, pre_experience_rows([records[i] for i in ids], template))
        chosen = set(picked)
        # Which cluster each instruction fell in: what a user reads to see what the clusters are about.
        write_jsonl(folder / CLUSTERS, [{"id": row["id"], "cluster": int(labels[i]), "perplexity": row["perplexity"],
                                         "picked": i in chosen} for i, row in enumerate(ppl_rows)])
        sizes = np.bincount(labels, minlength=pre.n_clusters)
        taken = np.bincount(labels[picked], minlength=pre.n_clusters)
        pre_experience_figure(sizes, taken, ppl, ppl[picked], folder / "pre_experience.png",
                              f"Cherry pre-experience: {len(ids)} of {len(ppl_rows)} instructions, "
                              f"{pre.n_clusters} clusters")
        return {"metrics": {"candidates": len(ppl_rows), "picked": len(ids),
                            "cluster_size_min": int(sizes.min()), "cluster_size_max": int(sizes.max()),
                            "clusters_taken_whole": int((sizes < pre.per_cluster).sum())},
                "params": {"n_clusters": pre.n_clusters, "per_cluster": pre.per_cluster, "band": list(pre.band)},
                "artifacts": ["pre_experience_ids.txt", CLUSTERS, "pre_experience.png"],
                "summary": f"Picked **{len(ids)}** pre-experience samples from {pre.n_clusters} clusters "
                           f"(perplexity band {pre.band[0]:g}-{pre.band[1]:g} pct)."}

    config = {**{k: v for k, v in pre.model_dump(mode="json").items() if k != "sft"}, "template": template}
    return run_stage("cherry-pick", config, [records_out, profile_out], body, digest_of=[PRE_EXPERIENCE_TRAIN])


def pre_experience_sft(pick_out: StageOutput, scoring: ScoringConfig, pre: PreExperienceConfig) -> StageOutput:
    """Stage `cherry-sft`: the brief SFT of the scorer on the pre-experience set; params.model_dir is the result."""
    from tasks.train import TRAIN_REJECTS, read_train_result, sft_train

    def body(folder: Path) -> dict:
        sft_train(pick_out.file(PRE_EXPERIENCE_TRAIN), scoring.scorer, pre.sft, folder / "train")
        model_dir = folder / pre_experienced_dir(pre)
        result = read_train_result(folder / "train")
        metrics = {"examples": float(result.get("examples", 0)), "global_step": float(result.get("global_step", 0))}
        if result.get("train_loss") is not None:
            metrics["train_loss"] = float(result["train_loss"])
        dropped = int(result.get("examples_dropped", 0))
        metrics.update(examples_given=float(result.get("examples_given", metrics["examples"])),
                       examples_dropped_truncated=float(dropped))
        note = (f"; {dropped} of the {int(metrics['examples_given'])} picked had no answer token left at "
                f"pre_experience.sft.max_length={pre.sft.max_length} and were not trained on "
                "(train/train_rejects.jsonl)"
                if dropped else "")
        return {"metrics": metrics, "params": {"model_dir": pre_experienced_dir(pre),
                                               "base_model": scoring.scorer.name_or_path},
                "artifacts": [f"train/{TRAIN_REJECTS}"] if (folder / "train" / TRAIN_REJECTS).exists() else [],
                "summary": f"Pre-experienced `{scoring.scorer.name_or_path}` on {int(metrics['examples'])} samples "
                           f"({int(metrics['global_step'])} steps){note}: `{model_dir}`."}

    # the digest covers the weights the score stage loads (train_result.json holds wall-clock timings: digesting it
    # made every retraining a new input for the stages downstream, identical weights or not), the same in every
    # home (training_args.bin pickles the home's output folder), as train-sft's
    return run_stage("cherry-sft", {"scorer": scoring.scorer, "sft": pre.sft}, [pick_out], body,
                     digest_of=[pre_experienced_dir(pre)], digest_file=portable_model_digest)


def pre_experienced_dir(pre: PreExperienceConfig) -> str:
    """Where, inside the `cherry-sft` stage folder, the pre-experienced model is (LoRA: merged into its base)."""
    from tasks.train import MERGED_DIR, MODEL_DIR

    return f"train/{MERGED_DIR if pre.sft.lora is not None else MODEL_DIR}"


def ifd_selection(records_out: StageOutput, scores_out: StageOutput, selection: CherrySelection | SuperfilterSelection,
                  output_format: str = "source") -> StageOutput:
    """Stage `select-cherry` / `select-superfilter`: IFD, threshold, budget, subset, histogram and counts."""
    kind: IFDKind = selection.method

    def body(folder: Path) -> dict:
        from tasks.plots import histogram

        records = load_canonical(records_out.file("records.jsonl"))
        rows = skip_undefined_ifd(read_scores(scores_out), kind)
        if [r["id"] for r in rows] != [r.id for r in records]:
            raise RuntimeError("score table and records disagree on ids/order: were they scored from these records?")
        ifd = ifd_scores(rows, kind)
        ids, counts = select_by_ifd([r.id for r in records], ifd, selection.rule, selection)
        if not ids:
            raise nothing_selected(f"select-{kind}", records_out, why_ifd_kept_nothing(rows, ifd, selection.rule))
        chosen = set(ids)
        write_jsonl(folder / "ifd_scores.jsonl", (
            {"id": row["id"], "ifd": value, "status": row["status"], "reason": row["reason"],
             "truncated": row["truncated"], "cond_mean_nll": row["cond_mean_nll"],
             "direct_mean_nll": row["direct_mean_nll"], "selected": row["id"] in chosen}
            for row, value in zip(rows, ifd)))
        write_jsonl(folder / "rejects.jsonl", ({"id": r["id"], "status": r["status"], "reason": r["reason"]}
                                               for r in rows if r["status"] != STATUS_SCORED))
        values = [v for v in ifd if v is not None]
        histogram(values, folder / "ifd_histogram.png", f"{kind} IFD ({len(values)} scored)", "IFD",
                  threshold=selection.rule.threshold,
                  selected=[v for row, v in zip(rows, ifd) if v is not None and row["id"] in chosen])
        fields = write_subset(records, ids, folder, kind, output_format)
        metrics = score_counts(rows)
        metrics.update(counts)
        metrics.update(fields["metrics"])
        if values:
            metrics.update(ifd_mean=float(np.mean(values)), ifd_median=float(np.median(values)))
        fields["metrics"] = metrics
        fields["artifacts"] += ["ifd_histogram.png", "ifd_scores.jsonl", "rejects.jsonl"]
        fields["params"] = {"ifd": kind, "scorer": _model_label(scores_out), "template": selection.scoring.template,
                            "threshold": selection.rule.threshold, "strict": selection.rule.strict,
                            "share_of": selection.rule.share_of}
        fields["summary"] = (
            f"{kind} IFD with `{_model_label(scores_out)}` (template `{selection.scoring.template}`): "
            f"{int(metrics['scored'])} scored, {int(counts['dropped_above_threshold'])} dropped with IFD above "
            f"{selection.rule.threshold:g}, {int(metrics['skipped'])} skipped, {int(metrics['nonfinite'])} non-finite, "
            f"{int(metrics['truncated'])} truncated; kept **{len(ids)}** of {len(records)}.")
        return fields

    config = {"selection": selection.model_dump(mode="json", include={"budget", "share", "rule", "method"}),
              "template": selection.scoring.template, "output_format": output_format}
    return run_stage(f"select-{kind}", config, [records_out, scores_out], body, digest_of=SUBSET_FILES)


def facility_coverage(embeddings: np.ndarray, order: list[int], kernel: Literal["euclidean", "cosine"] = "euclidean",
                      chunk: int = 256) -> np.ndarray:
    """The facility-location objective after each pick of `order`, as a share of the pool's own full coverage:
    f(S_k) / n with f(S) = sum_i max(0, max_{j in S} sim(i, j)) (every sample covers itself with similarity 1, so
    n is the most any set reaches). A curve that flattens well before the budget says a smaller budget covers the
    pool about as well."""
    x = unit_rows(embeddings)
    cover = np.zeros(len(x))
    curve = np.empty(len(order))
    for start in range(0, len(order), chunk):
        picks = order[start:start + chunk]
        sims = np.maximum(facility_kernel(x, x[picks], kernel), 0.0)  # [n, len(picks)]
        for k in range(len(picks)):
            cover = np.maximum(cover, sims[:, k])
            curve[start + k] = cover.sum() / len(x)
    return curve


def diversity_text(record: Record) -> str:
    """The text Superfiltering.D embeds, as the authors' `combine_sentences` writes it: instruction + "\\n" +
    input + "\\n" + output for a row with an `input` field (even an empty one), instruction + "\\n" + output else."""
    instruction, input_text, output = record.alpaca_fields()
    if record.source_format == "alpaca" and "input" in record.source:
        return instruction + "\n" + input_text + "\n" + output
    return instruction + "\n" + output


def diversity_selection(records_out: StageOutput, ifd_out: StageOutput, selection: SuperfilterSelection,
                        output_format: str = "source") -> StageOutput:
    """Stage `select-superfilter-d`: facility location over embeddings of the IFD-selected samples.

    A sample whose texts that are embedded (`diversity_text`) hold one of the embedder's special tokens as a string
    is left out of the step (the embedder, another model than the scorer, would embed that control token): listed
    in `rejects.jsonl` with the field and token, counted (`diversity_special_tokens`); all of them: a ConfigError.
    """
    diversity: DiversityConfig = selection.diversity  # type: ignore[assignment]
    embedder = diversity.embedder or selection.scoring.scorer

    def body(folder: Path) -> dict:
        from models.embeddings import embed_texts
        from models.loading import load_model
        from tasks.plots import line_chart

        records = load_canonical(records_out.file("records.jsonl"))
        chosen = set(ifd_out.file("selected_ids.txt").read_text().split())
        selected = [r for r in records if r.id in chosen]
        model, tokenizer = load_model(embedder)
        pattern = special_token_pattern(tokenizer)
        held = {r.id: first_special_token(scored_texts(r), pattern) for r in selected}
        rejects = [{"id": r.id, "location": r.location, "reason": special_token_reason(held[r.id][1], held[r.id][0])}
                   for r in selected if held[r.id]]
        write_jsonl(folder / "rejects.jsonl", rejects)
        left_out = report_special_tokens("select-superfilter-d", (r["reason"] for r in rejects), len(selected),
                                         "IFD-selected samples", folder / "rejects.jsonl")
        pool = [r for r in selected if not held[r.id]]
        emb = embed_texts(model, tokenizer, [diversity_text(r) for r in pool], pooling=diversity.pooling,
                          batch_size=diversity.batch_size, normalize=True, progress=True, max_length=diversity.max_length)
        order = facility_location(emb, diversity.budget, diversity.kernel)
        ids = [pool[i].id for i in order]
        atomic_write_text(folder / "facility_location_order.json", json.dumps(ids))
        fields = write_subset(records, ids, folder, "superfilter-d", output_format)
        coverage = facility_coverage(emb, order, diversity.kernel)
        line_chart(np.arange(1, len(order) + 1), coverage, folder / "coverage.png",
                   f"Superfiltering.D coverage of {len(pool)} ({diversity.kernel} kernel)",
                   "samples kept (in the order chosen)",
                   "facility-location coverage (share of the pool)")
        fields["metrics"].update(ifd_selected=len(selected), diversity_embedded=len(pool),
                                 diversity_special_tokens=left_out, coverage=float(coverage[-1]))
        fields["artifacts"] += ["facility_location_order.json", "rejects.jsonl", "coverage.png"]
        fields["params"] = {"embedder": embedder.name_or_path, "pooling": diversity.pooling,
                            "diversity_budget": diversity.budget, "kernel": diversity.kernel}
        fields["summary"] = (f"Superfiltering.D: facility location kept **{len(ids)}** of the {len(pool)} embedded "
                             f"IFD-selected samples (embedder `{embedder.name_or_path}`).")
        if left_out:
            fields["summary"] += (f" {left_out} of the {len(selected)} hold one of the embedder's special tokens as "
                                  "text and were left out of the step (rejects.jsonl).")
        return fields

    return run_stage("select-superfilter-d", {"diversity": diversity, "embedder": embedder,
                                              "output_format": output_format},
                     [records_out, ifd_out], body, digest_of=SUBSET_FILES)


instruction_profile_task = stage_task(instruction_profile, name="cherry-instructions")
pre_experience_pick_task = stage_task(pre_experience_pick, name="cherry-pick")
pre_experience_sft_task = stage_task(pre_experience_sft, name="cherry-sft")
ifd_selection_task = stage_task(ifd_selection, name="select-ifd")
diversity_selection_task = stage_task(diversity_selection, name="select-superfilter-d")
