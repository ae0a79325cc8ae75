"""Deita's selection math: the evol score, the ranking, and the diversity filter - plain numpy/torch, no Prefect.

The filter's definition is sequential: walk the candidates by score, descending (ties keep input order), and keep
one unless its cosine similarity to ANY already-kept sample is > tau; stop at the budget. `diversity_filter` is the
blocked implementation of that definition and returns exactly the selection of `diversity_filter_sequential`:
both compare in float32 and settle any similarity within `margin` of tau with the same exactly rounded float64
dot product, so rounding differences between a matrix product and a vector product cannot flip a decision.
Kept apart from `tasks/deita.py` (the stages) so the filter and its benchmark run where only numpy and torch are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from configs.errors import ScoringError

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


def _product_margin(dtype, dim: int) -> float:
    """The error bound of a `dtype` product of unit vectors of `dim` coordinates (see the two margins above)."""
    import torch

    return bfloat16_margin(dim) if dtype == torch.bfloat16 else float32_margin(dim)


SCREEN_PIECE = 2048  # kept rows per screen product
SCREEN_SUB = 512     # block rows per product when a block is compared with itself (its lower triangle only)
BOUND_MAX_PAIRS = 32  # open pairs a row may leave the bound screen; more, and the full screen is cheaper for it
BOUND_MAX_LOAD = 4    # open pairs per row in a block (a crowded row counting BOUND_MAX_PAIRS) past which settling
                      # them one by one costs more than the bound screen saves: then it is dropped


def _products_with_kept(block, kept, n_kept: int, piece: int):
    """(first column, block @ kept[columns].T) over the first `n_kept` rows of the zero-padded `kept` buffer, `piece`
    rows at a time and the tail in power-of-two pieces (`_piece_width`): few distinct product shapes, as oneDNN
    compiles a kernel per shape (~20 ms each)."""
    c0 = 0
    while c0 < n_kept:
        width = _piece_width(n_kept - c0, piece)
        products = block @ kept[c0:c0 + width].T
        yield c0, products[:, :n_kept - c0] if n_kept - c0 < width else products  # padding rows are not kept
        c0 += width


def _rows_too_similar(rows: np.ndarray, block_low, kept_low, kept_rows, n_kept: int, piece: int, tau: float,
                      margin: float, margin32: float) -> np.ndarray:
    """Per block row: is its similarity to any of the first `n_kept` kept rows > tau?

    `rows` are the block's float32 unit rows, `block_low` the same in the screen's dtype, `kept_low` the kept
    rows in that dtype and `kept_rows(columns)` gives kept rows in float32. The screen multiplies `block_low` by
    `kept_low` a piece at a time (`_products_with_kept`). A row is decided by its maximum unless that lies within
    `margin` of tau; such rows look at their pairs near tau in float32, then exactly.
    """
    import torch

    row_max = torch.full((len(rows),), -2.0, device=block_low.device)
    pairs_r, pairs_c = [], []
    for c0, sims in _products_with_kept(block_low, kept_low, n_kept, piece):
        chunk_max = sims.amax(dim=1).float()
        row_max = torch.maximum(row_max, chunk_max)
        unsure = torch.nonzero((chunk_max >= tau - margin) & (chunk_max <= tau + margin)).flatten()
        if len(unsure):
            r, c = torch.nonzero(sims[unsure] >= tau - margin, as_tuple=True)
            pairs_r.append(unsure[r])
            pairs_c.append(c + c0)
    too_similar = (row_max > tau + margin).cpu().numpy()
    if pairs_r:
        _settle_pairs(rows, torch.cat(pairs_r).cpu().numpy(), torch.cat(pairs_c).cpu().numpy(), kept_rows, tau,
                      margin32, too_similar)
    return too_similar


def _settle_pairs(rows: np.ndarray, r: np.ndarray, c: np.ndarray, kept_rows, tau: float, margin32: float,
                  too_similar: np.ndarray) -> None:
    """Mark block row r[p] too similar where its similarity to kept row c[p] exceeds tau: float32 decides unless
    within `margin32` of tau, then the exact dot does. Rows already marked are skipped."""
    r, c = r[~too_similar[r]], c[~too_similar[r]]
    if not len(r):
        return
    kept32 = kept_rows(c)
    sims32 = np.einsum("ij,ij->i", rows[r], kept32)  # float32: within margin32 of the exact value
    too_similar[r[sims32 > tau + margin32]] = True
    band = np.nonzero((sims32 >= tau - margin32) & (sims32 <= tau + margin32) & ~too_similar[r])[0]
    for p in band.tolist():  # float32 cannot tell: the exact dot decides
        if not too_similar[r[p]]:
            too_similar[r[p]] = exact_similarity(rows[r[p]], kept32[p]) > tau


def bound_rows(rows: np.ndarray, dims: int) -> np.ndarray:
    """Unit rows of `dims` + 1 coordinates whose dot products bound the full rows' from above: the first `dims`
    coordinates, then the norm of the rest. x.y = x_head.y_head + x_rest.y_rest <= x_head.y_head + |x_rest||y_rest|
    (Cauchy-Schwarz), so a pair whose bound is below tau cannot exceed it, at a fraction of the product's cost."""
    out = np.empty((len(rows), dims + 1), dtype=np.float32)
    out[:, :dims] = rows[:, :dims]
    out[:, dims] = np.sqrt(np.einsum("ij,ij->i", rows[:, dims:], rows[:, dims:], dtype=np.float32))
    return out


def default_bound_dims(dim: int) -> int:
    """The bound screen's head for `bound_dims="auto"`: a quarter of the dimensions (so its products cost a
    quarter) less the norm column; none below 256 dimensions, where the full products are cheap already."""
    return dim // 4 - 1 if dim >= 256 else 0


def _rows_over_bound(bound_low, kept_bound, n_kept: int, piece: int, threshold: float, max_pairs: int):
    """The bound screen: per block row, the kept columns whose bound reaches `threshold` (pairs (rows, columns)),
    and which rows have more than `max_pairs` such columns ("crowded": their pairs are not listed, the full screen
    takes them). Products a piece of kept rows at a time (`_products_with_kept`)."""
    import torch

    counts = torch.zeros(len(bound_low), dtype=torch.int64, device=bound_low.device)
    pairs_r, pairs_c = [], []
    for c0, bounds in _products_with_kept(bound_low, kept_bound, n_kept, piece):
        listed = torch.nonzero((bounds.amax(dim=1).float() >= threshold) & (counts <= max_pairs)).flatten()
        if len(listed):
            r, c = torch.nonzero(bounds[listed] >= threshold, as_tuple=True)
            r = listed[r]
            counts += torch.bincount(r, minlength=len(counts))
            pairs_r.append(r)
            pairs_c.append(c + c0)
    crowded = (counts > max_pairs).cpu().numpy()
    if not pairs_r:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64), crowded
    r, c = torch.cat(pairs_r).cpu().numpy(), torch.cat(pairs_c).cpu().numpy()
    return r[~crowded[r]], c[~crowded[r]], crowded


def _earlier_pairs(vectors, i0: int, n: int, threshold: float, upper) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (r, c) of a block's rows i0 + r (r < n) and c < i0 + r whose product reaches `threshold`: the lower
    triangle of the block's own products, one sub-block of rows at a time (`upper` masks the diagonal and above)."""
    import torch

    sims = vectors[i0:i0 + n] @ vectors[:i0 + n].T
    sims[:, i0:].masked_fill_(upper[:n, :n], -2.0)  # a row is compared to earlier rows only
    hit = torch.nonzero(sims.amax(dim=1).float() >= threshold).flatten()  # rows with a pair near tau
    if not len(hit):
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    r, c = torch.nonzero(sims[hit] >= threshold, as_tuple=True)
    return hit[r].cpu().numpy(), c.cpu().numpy()


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
                     precision: str = "auto", bound_dims: int | str = "auto") -> FilterResult:
    """The same selection as `diversity_filter_sequential`, computed a block of candidates at a time.

    Per block: matrix products against the kept samples, a fixed number of kept columns at a time (memory stays
    bounded by the block, `max_chunk_bytes` and the kept set, never n x n), reduced to each row's maximum (see
    `_rows_too_similar`); then the block's survivors are settled among themselves sequentially on the block's
    own similarity matrix. The products run in `screen_dtype` and only similarities near tau are recomputed, so
    the selection is exact whatever the precision. `embeddings` may be a memory-mapped array: only the rows of
    the current block are read.

    Before that full screen, a bound screen on `bound_dims` + 1 coordinates (`bound_rows`; "auto": a quarter of
    the dimensions from 256 on, 0: none) clears every pair that cannot exceed tau at a quarter of the cost; the
    pairs it leaves open are settled in float32 one by one, and a row with more than `BOUND_MAX_PAIRS` open pairs
    takes the full screen. Where many pairs stay open - similarities high across the board (raw LLM hidden
    states often share one dominant direction), or a head too narrow for the data - the bound screen is dropped
    for the rest of the run after a block with more than `BOUND_MAX_LOAD` open pairs per row.
    """
    import torch

    order = np.asarray(order, dtype=np.int64)
    dim = embeddings.shape[1]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    low = screen_dtype(device, precision)
    margin32 = float32_margin(dim)
    margin = _product_margin(low, dim)
    count = min(count, len(order))
    piece = max(1, min(SCREEN_PIECE, max_chunk_bytes // (4 * block_size)))
    sub = min(block_size, SCREEN_SUB)
    upper = torch.ones((sub, sub), dtype=torch.bool, device=device).triu()  # diagonal and above
    capacity = -(-count // piece) * piece + 128  # room for a padded last sliver (see _piece_width)
    kept_low = torch.zeros((capacity, dim), dtype=low, device=device)  # the kept rows, as the screen reads them
    if bound_dims == "auto":
        bound_dims = default_bound_dims(dim)
    if not isinstance(bound_dims, int) or not 0 <= bound_dims < dim:
        raise ValueError(f"bound_dims {bound_dims!r}: use 'auto', 0 (no bound screen) or 1..{dim - 1}")
    use_bound = bound_dims > 0
    if use_bound:
        margin_bound = _product_margin(low, bound_dims + 1) + margin32  # + the float32 norm of the rest
        kept_bound = torch.zeros((capacity, bound_dims + 1), dtype=low, device=device)

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

        if use_bound:
            block_bound = torch.from_numpy(bound_rows(rows, bound_dims)).to(device=device, dtype=low)

        # 1. block vs everything kept before this block
        rejected = np.zeros(len(rows), dtype=bool)
        if n_kept and use_bound:
            r, c, crowded = _rows_over_bound(block_bound, kept_bound, n_kept, piece, tau - margin_bound,
                                             BOUND_MAX_PAIRS)
            _settle_pairs(rows, r, c, kept_rows, tau, margin32, rejected)
            if crowded.any():
                full = np.nonzero(crowded)[0]
                rejected[full] = _rows_too_similar(rows[full], block_low[torch.from_numpy(full).to(device)],
                                                   kept_low, kept_rows, n_kept, piece, tau, margin, margin32)
            use_bound = (len(r) + BOUND_MAX_PAIRS * crowded.sum()) / len(rows) <= BOUND_MAX_LOAD
        elif n_kept:
            rejected = _rows_too_similar(rows, block_low, kept_low, kept_rows, n_kept, piece, tau, margin, margin32)

        # 2. survivors among themselves, in ranking order: only pairs that may exceed tau can conflict, so the
        # block's own products (lower triangle, `sub` rows at a time: repeated shapes) just list those pairs -
        # from the bound screen unless it lists too many, then from the full screen.
        pairs: dict[int, list[int]] = {}
        for i0 in range(0, len(rows), sub):
            n_here = min(sub, len(rows) - i0)
            if use_bound:
                r, c = _earlier_pairs(block_bound, i0, n_here, tau - margin_bound, upper)
            if not use_bound or len(r) > BOUND_MAX_PAIRS * n_here:
                r, c = _earlier_pairs(block_low, i0, n_here, tau - margin, upper)
            for i, j in zip((r + i0).tolist(), c.tolist()):
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
            new_rows = torch.from_numpy(new).to(device)
            kept_low[n_kept:n_kept + len(new)] = block_low[new_rows]
            if use_bound:
                kept_bound[n_kept:n_kept + len(new)] = block_bound[new_rows]
            if bar is not None:
                bar.update(len(new))
        start += len(block_index)
    if bar is not None:
        bar.close()
    return FilterResult(np.asarray(selected, dtype=np.int64), _examined(len(order), len(selected), count, last))
