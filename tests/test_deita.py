"""Deita: the expected-score formula, per-turn scoring, the diversity filter against a plain loop, the flow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from configs.deita import DeitaEmbeddingConfig, DeitaFlowConfig, DeitaScorerConfig, DeitaSelection
from configs.errors import ConfigError, ScoringError
from configs.schema import DataConfig, ModelConfig
from models.deita import (COMPLEXITY_TEMPLATE, QUALITY_TEMPLATE, DeitaScorer, detect_kind, expected_scores,
                          score_token_ids, single_token_ids)
from models.loading import load_model
from tasks.deita_selection import (_next_block_size, _piece_width, bfloat16_margin, bound_rows,
                                   diversity_filter, diversity_filter_sequential, evol_scores, exact_similarity,
                                   ranking_order, screen_dtype, unit_rows)

from conftest import DATA, HELD_REASON, held_copies, task_states


# ------------------------------------------------------------------------------------------- the formula
def test_prompts_are_the_reference_string_literals():
    # Copied character for character from deita/selection/scorer/llama_scorer.py (see REFERENCE.md).
    assert COMPLEXITY_TEMPLATE == ("You are a helpful assistant. Please identify the complexity score of the following "
                                   "user query. \n##Query: {instruction}  \n##Complexity: ")
    assert QUALITY_TEMPLATE == ("You are a helpful assistant. Please identify the quality score of the Response "
                                "corresponding to the Question. \n #Question#:\n{instruction}\n#Response#:\n{output} "
                                "\n##Quality: ")


def test_expected_score_equals_hand_computation():
    # logits 0..5 for "1".."6": p_i = e^(i-1) / sum_j e^(j-1); score = sum_i i p_i
    e = [1.0, 2.718281828, 7.389056099, 20.08553692, 54.59815003, 148.4131591]
    by_hand = sum((i + 1) * v for i, v in enumerate(e)) / sum(e)  # = 5.4329...
    got = expected_scores([[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 0, 0], [50, 0, 0, 0, 0, 0], [2.0, 2.0, -1e4, -1e4, -1e4, -1e4]])
    assert got[0] == pytest.approx(by_hand, abs=1e-8) and round(by_hand, 4) == 5.4329
    assert got[1] == pytest.approx(3.5)          # uniform over 1..6
    assert got[2] == pytest.approx(1.0)          # all mass on "1"
    assert got[3] == pytest.approx(1.5)          # half on "1", half on "2"
    with pytest.raises(ScoringError, match="non-finite"):
        expected_scores([[0, 1, 2, 3, float("nan"), 5]])


@pytest.fixture(scope="module")
def tiny_scorer(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), device="cpu")
    return DeitaScorer.load(cfg, "complexity", batch_size=3), DeitaScorer.load(cfg, "quality", batch_size=2)


def test_model_score_is_the_formula_on_the_next_token_logits(tiny_scorer):
    scorer, _ = tiny_scorer
    tok = scorer.tokenizer
    assert scorer.token_ids == [tok.convert_tokens_to_ids(d) for d in "123456"]
    assert scorer.kind == "approximate" and scorer.params()["complexity_scorer_kind"] == "approximate"
    instructions = ["Give three tips for staying healthy.", "What is 2+2?",
                    "Write a short poem about the sea, the moon and the stars over the quiet harbour."]
    batched = scorer.score_prompts([scorer.prompt(i) for i in instructions])
    for instruction, score in zip(instructions, batched):
        ids = torch.tensor([tok(COMPLEXITY_TEMPLATE.format(instruction=instruction))["input_ids"]])
        with torch.no_grad():
            logits = scorer.model(input_ids=ids).logits[0, -1, scorer.token_ids].double()
        p = torch.softmax(logits, dim=0)
        assert score == pytest.approx(float((p * torch.arange(1, 7)).sum()), abs=1e-5)


def test_multi_turn_conversations_are_scored_per_turn(tiny_scorer):
    complexity, quality = tiny_scorer
    conversations = [[("What is 2+2?", "4."), ("And times 3?", "12.")], [("Name a fruit.", "Apple.")]]
    c = complexity.score_turns(conversations)
    q = quality.score_turns(conversations)
    assert [len(t) for t in c] == [2, 1] and [len(t) for t in q] == [2, 1]
    alone = quality.score_prompts([quality.prompt("And times 3?", "12.")])[0]
    assert q[0][1] == pytest.approx(alone, abs=1e-6)
    assert q[0][0] != pytest.approx(q[0][1], abs=1e-9)  # each pair on its own, not the conversation's prefix
    evol = evol_scores(c, q, "evol")
    assert evol[0] == pytest.approx(c[0][0] * q[0][0] + c[0][1] * q[0][1])
    assert evol_scores(c, q, "complexity")[0] == pytest.approx(sum(c[0]))
    assert evol_scores(c, q, "quality")[1] == pytest.approx(q[1][0])


class _NoDigitTokenizer:
    unk_token_id = 0

    def convert_tokens_to_ids(self, token):
        return 0

    def decode(self, ids):
        return "<unk>"

    def encode(self, text, add_special_tokens=False):
        return [5, 6]  # a digit split into two pieces


def test_a_digit_that_is_not_one_token_is_an_error():
    with pytest.raises(ScoringError, match="not a single token"):
        score_token_ids(_NoDigitTokenizer())


class _SentencePieceDigits:
    """Like Llama's tokenizer: each digit is a vocabulary piece, but `encode("1")` adds a word-start piece first."""

    unk_token_id = 0
    vocab = {"1": 29896, "2": 29906, "3": 29941, "4": 29946, "5": 29945, "6": 29953}

    def convert_tokens_to_ids(self, token):
        return self.vocab.get(token, 0)

    def decode(self, ids):
        return {v: k for k, v in self.vocab.items()}.get(ids[0], "<unk>")

    def encode(self, text, add_special_tokens=False):
        return [29871, self.vocab[text]] if text in self.vocab else [0]


def test_single_token_ids_prefers_the_vocabulary_piece_and_names_a_bad_label():
    from models.judge import LogitJudge

    tokenizer = _SentencePieceDigits()
    assert single_token_ids(tokenizer, ["1", "2"], "judge verdict") == [29896, 29906]
    assert score_token_ids(tokenizer) == [29896, 29906, 29941, 29946, 29945, 29953]
    # the judge reads its verdict logits through the same lookup (it used to refuse this tokenizer)
    assert LogitJudge(None, tokenizer).verdict_ids == [29896, 29906]
    with pytest.raises(ScoringError, match="judge verdict label '7' is not a single token"):
        single_token_ids(tokenizer, ["1", "7"], "judge verdict")
    with pytest.raises(ScoringError, match="judge verdict label '1' is not a single token"):
        LogitJudge(None, _NoDigitTokenizer())


def test_labels_sharing_one_id_are_an_error():
    class OneId(_SentencePieceDigits):
        def convert_tokens_to_ids(self, token):
            return 29896

        def decode(self, ids):
            return "1"

        def encode(self, text, add_special_tokens=False):
            return [29896]

    with pytest.raises(ScoringError, match="repeated ids"):
        single_token_ids(OneId(), ["1", "2"], "judge verdict")


def test_released_scorers_are_recognised_and_misuse_refused():
    assert detect_kind("hkust-nlp/deita-complexity-scorer", "complexity", "auto") == "reference"
    assert detect_kind("/models/deita-quality-scorer/", "quality", "auto") == "reference"
    assert detect_kind("/models/smollm2", "quality", "auto") == "approximate"
    with pytest.raises(ConfigError, match="quality scorer"):
        detect_kind("hkust-nlp/deita-quality-scorer", "complexity", "auto")


# ---------------------------------------------------------------------------------------- the filter
def plain_loop(embeddings: np.ndarray, scores: np.ndarray, tau: float, budget: int) -> list[int]:
    """Deita's definition in plain Python: by score (stable), keep unless cos > tau with any kept one."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    unit = [v / math.sqrt(sum(float(x) * float(x) for x in v)) for v in embeddings.astype(np.float64)]
    kept: list[int] = []
    for i in order:
        if len(kept) == budget:
            break
        if all(float(np.dot(unit[i], unit[j])) <= tau for j in kept):
            kept.append(i)
    return kept


def planted(n: int, d: int, n_dups: int, seed: int):
    """Random vectors, near-duplicates straddling tau = 0.9, and scores with many ties."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    src, dst = rng.choice(n, n_dups, replace=False), rng.choice(n, n_dups, replace=False)
    noise = rng.standard_normal((n_dups, d)) / math.sqrt(d)
    x[dst] = (x[src] / np.linalg.norm(x[src], axis=1, keepdims=True)
              + rng.uniform(0.15, 0.5, (n_dups, 1)) * noise).astype(np.float32)
    scores = rng.integers(0, 20, n).astype(np.float64) / 4  # about 25 samples per score value: ties everywhere
    return x, scores


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("budget", [10_000, 150, 1])
def test_filter_equals_plain_sequential_loop(budget, precision, one_torch_thread):
    x, scores = planted(600, 48, 200, seed=budget)
    expected = plain_loop(x, scores, 0.9, budget)
    order = ranking_order(scores)
    assert order.tolist() == sorted(range(len(scores)), key=lambda i: -scores[i])  # ties keep input order
    reference = diversity_filter_sequential(x, order, 0.9, budget)
    assert reference.selected.tolist() == expected
    for block in (1, 13, 256, 4096):
        for bound_dims in (0, 11):  # without and with the bound screen (its "auto" starts at 256 dimensions)
            fast = diversity_filter(x, order, 0.9, budget, block_size=block, max_chunk_bytes=1 << 14,
                                    precision=precision, bound_dims=bound_dims)
            assert fast.selected.tolist() == expected, f"block {block}, bound_dims {bound_dims}"
            assert fast.examined == reference.examined
    if budget == 10_000:  # no budget: the walk covers everything and near-duplicates are rejected
        assert reference.examined == len(x) and 0 < reference.rejected < 200
    elif budget == 150:   # budget exhausted: stops right after the 150th kept sample
        assert len(reference.selected) == 150 and reference.examined < len(x)
        assert reference.examined - 1 == order.tolist().index(expected[-1])
    else:
        assert reference.selected.tolist() == [int(order[0])] and reference.examined == 1


def test_similarities_at_the_threshold_are_settled_exactly(one_torch_thread):
    # pairs whose cosine lies within float32 noise of tau: both implementations decide by the exact value
    rng = np.random.default_rng(7)
    d = 256
    base = unit_rows(rng.standard_normal((40, d)))
    ortho = unit_rows(rng.standard_normal((40, d)))
    ortho = unit_rows(ortho - (ortho * base).sum(1, keepdims=True) * base)
    tau = 0.9
    target = tau + rng.uniform(-3e-7, 3e-7, (40, 1))
    near = unit_rows(target * base + np.sqrt(1 - target ** 2) * ortho)
    x = np.concatenate([base, near])
    scores = np.concatenate([np.full(40, 2.0), np.full(40, 1.0)])
    order = ranking_order(scores)
    units = unit_rows(x)
    truth = [i for i in range(40)] + [40 + i for i in range(40) if exact_similarity(units[40 + i], units[i]) <= tau]
    assert 0 < len(truth) - 40 < 40  # some near pairs fall on each side of tau
    seq = diversity_filter_sequential(x, order, tau, 1000)
    fast = diversity_filter(x, order, tau, 1000, block_size=16)
    assert sorted(seq.selected.tolist()) == truth and fast.selected.tolist() == seq.selected.tolist()


def test_bound_rows_bound_every_similarity_from_above():
    rng = np.random.default_rng(3)
    x = unit_rows(np.concatenate([rng.standard_normal((300, 64)),
                                  np.repeat(rng.standard_normal((3, 64)), 100, axis=0)
                                  + 0.3 * rng.standard_normal((300, 64))]))
    exact = x.astype(np.float64) @ x.astype(np.float64).T
    for dims in (1, 15, 63):
        b = bound_rows(x, dims).astype(np.float64)
        assert b.shape == (600, dims + 1) and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-6)
        bound = b @ b.T
        assert (bound >= exact - 1e-6).all()
        assert (np.abs(np.diag(bound) - 1) < 1e-6).all()  # tight on x.x
    # with one coordinate left over, the slack is |x_63 y_63| - x_63 y_63: zero unless the signs differ
    last = np.outer(x[:, 63], x[:, 63]).astype(np.float64)
    assert np.allclose(bound - exact, np.abs(last) - last, atol=1e-6)
    assert (bound_rows(x, 1) @ bound_rows(x, 1).T - exact).mean() > 0.1  # a loose bound with one coordinate kept


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_bound_screen_margin_on_tight_bounds(precision, one_torch_thread):
    # Every row's coordinates past the bound's head point the same way, so the bound equals the similarity and only
    # the screen's margin stands between a pair just above tau and a wrong keep.
    rng = np.random.default_rng(13)
    d, head, n = 64, 15, 120
    tail = unit_rows(rng.standard_normal((1, d - head)))[0]
    base = unit_rows(rng.standard_normal((n, head)))
    ortho = unit_rows(rng.standard_normal((n, head)))
    ortho = unit_rows(ortho - (ortho * base).sum(1, keepdims=True) * base)
    cos = 0.8 + 2 * rng.uniform(-0.015, 0.015, (n, 1))  # similarity 0.5 + 0.5 cos: tau +- 0.015
    near = cos * base + np.sqrt(1 - cos ** 2) * ortho
    heads = np.concatenate([base, near])
    x = (np.sqrt(0.5) * np.hstack([heads, np.tile(tail, (2 * n, 1))])).astype(np.float32)
    scores = np.concatenate([np.full(n, 2.0), np.full(n, 1.0)])
    units = unit_rows(x)
    bounds = bound_rows(units, head).astype(np.float64)
    pair_sims = (units[:n].astype(np.float64) * units[n:]).sum(1)
    assert np.abs((bounds[:n] * bounds[n:]).sum(1) - pair_sims).max() < 1e-6  # the bound is tight here
    order = ranking_order(scores)
    expected = plain_loop(x, scores, 0.9, 10_000)
    assert 10 < len(expected) - n < n - 10 and (np.abs(pair_sims - 0.9) < bfloat16_margin(head + 1)).sum() > 50
    fast = diversity_filter(x, order, 0.9, 10_000, block_size=32, precision=precision, bound_dims=head)
    assert fast.selected.tolist() == expected


def test_bound_screen_hands_crowded_rows_to_the_full_screen(one_torch_thread, monkeypatch):
    # Half the rows keep most of their energy past the bound's head, so every pair's bound is near 1 and those rows
    # are crowded; the other half are spread out. Near-duplicates are planted in both halves.
    import tasks.deita_selection as selection

    n, d, head = 800, 64, 15
    x, scores = planted(n, d, 250, seed=5)
    x[: n // 2, :head] *= 0.05
    order = ranking_order(scores)
    full_rows = []
    screen = selection._rows_too_similar
    monkeypatch.setattr(selection, "_rows_too_similar",
                        lambda rows, *a: full_rows.append(len(rows)) or screen(rows, *a))
    expected = plain_loop(x, scores, 0.9, 10_000)
    for precision in ("float32", "bfloat16"):
        for block in (64, 600):  # 64: blocks of all sorts; 600: most rows crowded, then the bound screen is dropped
            full_rows.clear()
            fast = diversity_filter(x, order, 0.9, 10_000, block_size=block, precision=precision, bound_dims=head)
            assert fast.selected.tolist() == expected, (precision, block)
            assert 0 < sum(full_rows) < n  # some rows took the full screen, not all of them
    assert 0 < n - len(expected) < 250  # near-duplicates were rejected


def test_bound_screen_is_kept_where_it_pays_and_dropped_where_it_does_not(one_torch_thread, monkeypatch):
    import tasks.deita_selection as selection

    calls = []
    screen = selection._rows_over_bound
    monkeypatch.setattr(selection, "_rows_over_bound", lambda *a: calls.append(1) or screen(*a))
    x, scores = planted(1200, 256, 300, seed=8)
    shared = unit_rows(np.random.default_rng(8).standard_normal((1, 256)))
    order = ranking_order(scores)
    for data, expect_kept in ((x, True), (unit_rows(x) + 1.5 * shared, False)):  # spread out; one shared direction
        calls.clear()
        fast = diversity_filter(data, order, 0.9, 10_000, block_size=100)  # bound_dims "auto": 63 of 256
        assert fast.selected.tolist() == plain_loop(data, scores, 0.9, 10_000)
        blocks_after_first = -(-fast.examined // 100) - 1
        assert (len(calls) == blocks_after_first) == expect_kept and len(calls) >= 1


@pytest.mark.parametrize("dim", [48, 1024])
def test_bfloat16_screen_stays_within_its_margin(dim):
    # the margin must bound the screen's error on every pair, most of all near tau where it decides
    import torch

    rng = np.random.default_rng(dim)
    centers = unit_rows(rng.standard_normal((20, dim)))
    members = centers[rng.integers(0, 20, 400)] + rng.uniform(0.2, 0.45, (400, 1)) * rng.standard_normal((400, dim)) / math.sqrt(dim)
    x = unit_rows(np.concatenate([members, rng.standard_normal((200, dim))]))
    exact = x.astype(np.float64) @ x.astype(np.float64).T
    low = torch.from_numpy(x).bfloat16()
    screen = (low @ low.T).double().numpy()
    assert ((exact > 0.8) & (exact < 0.99)).sum() > 100  # plenty of pairs near tau
    assert np.abs(screen - exact).max() <= bfloat16_margin(dim)
    assert bfloat16_margin(dim) < 0.02  # and it is narrow enough that few pairs need the float32 look


def test_screen_dtype_choice_and_errors():
    import torch

    assert screen_dtype("cpu", "float32") == torch.float32 and screen_dtype("cpu", "bfloat16") == torch.bfloat16
    assert screen_dtype("cuda", "auto") == torch.float32
    with pytest.raises(ValueError, match="CPUs"):
        screen_dtype("cuda", "bfloat16")
    with pytest.raises(ValueError, match="float16"):
        screen_dtype("cpu", "float16")


def test_tail_blocks_shrink_to_what_the_budget_needs():
    assert _next_block_size(1024, 10_000, 0, 0) == 1024       # nothing kept yet: a full block
    assert _next_block_size(1024, 5_000, 2_000, 1_000) == 1024  # far from the budget
    assert _next_block_size(1024, 100, 9_000, 7_200) == 256    # 100 / 0.8 * 1.1 = 138 -> next power of two from 64
    assert _next_block_size(1024, 1, 9_000, 9_000) == 64
    assert _next_block_size(100, 1_000, 1_000, 1_000) == 100


def test_screen_pieces_cover_the_kept_rows_with_few_shapes():
    for piece in (2048, 315, 16):
        for n_kept in (1, 100, 127, 128, 129, 2047, 2048, 5000, 10_000):
            widths, c0 = [], 0
            while c0 < n_kept:
                widths.append(_piece_width(n_kept - c0, piece))
                c0 += widths[-1]
            assert all(w <= piece for w in widths) and c0 - n_kept < 128  # covered, padding under one sliver
            assert len(set(widths)) <= 6
    assert _piece_width(5000, 2048) == 2048 and _piece_width(1100, 2048) == 1024 and _piece_width(76, 2048) == 128


@pytest.mark.parametrize("dim", [33, 1024, 4096])
def test_unit_rows_is_row_wise(dim):
    # the blocked filter normalises blocks, the sequential one single rows: they must get the same vectors
    x = np.random.default_rng(dim).standard_normal((300, dim)).astype(np.float32) * 3
    whole = unit_rows(x)
    assert np.array_equal(whole[17:29], unit_rows(x[17:29]))
    assert all(np.array_equal(whole[i], unit_rows(x[i:i + 1])[0]) for i in range(len(x)))
    assert np.abs(np.linalg.norm(whole.astype(np.float64), axis=1) - 1).max() < 1e-6
    with pytest.raises(ScoringError):
        unit_rows(np.zeros((2, 3)))


# ---------------------------------------------------------------------------------------------- config
def test_config_defaults_and_validation():
    emb = DeitaEmbeddingConfig(model=ModelConfig(name_or_path="tiny:0"))
    scorer = DeitaScorerConfig(model=ModelConfig(name_or_path="tiny:0"))
    sel = DeitaSelection(complexity_scorer=scorer, quality_scorer=scorer, embedding=emb)
    assert sel.budget == 6000 and sel.tau == 0.9 and sel.score == "evol" and sel.embedding.pooling == "last"
    assert DeitaSelection(share=0.1, complexity_scorer=scorer, quality_scorer=scorer, embedding=emb).budget is None
    assert DeitaSelection(score="complexity", complexity_scorer=scorer, embedding=emb).quality_scorer is None
    with pytest.raises(ValueError, match="quality_scorer"):
        DeitaSelection(complexity_scorer=scorer, embedding=emb)
    for tau in (1.5, 0.0, -1.0):  # tau <= 0 would reject nearly every candidate after the first
        with pytest.raises(ValueError):
            DeitaSelection(complexity_scorer=scorer, quality_scorer=scorer, embedding=emb, tau=tau)
    # the filter's speed knobs do not change the selection: they stay out of the stage key
    from tasks.store import canonical

    tuned = DeitaSelection(complexity_scorer=scorer, quality_scorer=scorer, embedding=emb, filter_block_size=64,
                           filter_device="cpu", filter_precision="float32")
    assert canonical(tuned) == canonical(sel) and canonical(tuned.model_copy(update={"tau": 0.8})) != canonical(sel)
    with pytest.raises(ValueError, match="for CPUs"):
        DeitaSelection(complexity_scorer=scorer, quality_scorer=scorer, embedding=emb, filter_device="cuda",
                       filter_precision="bfloat16")


# ------------------------------------------------------------------------------------ stages resume
def test_scoring_and_embedding_stages_resume_from_their_shards(tiny_model_dir, monkeypatch, one_torch_thread):
    import models.embeddings
    from tasks.data import load_canonical, prepare_records
    from tasks.deita import embed_records, score_dimension, vicuna_text
    from tasks.store import ShardedTable

    records_out = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=9))
    tiny = ModelConfig(name_or_path=str(tiny_model_dir), device="cpu")
    scorer = DeitaScorerConfig(model=tiny, shard_size=4)
    first = score_dimension("complexity", records_out, scorer, progress=False)
    folder = Path(first.path)
    (folder / "_SUCCESS").unlink()      # as if killed after writing its last shard
    (folder / "scores.jsonl").unlink()
    monkeypatch.setattr(DeitaScorer, "load", lambda *a, **k: pytest.fail("the model loaded with nothing to score"))
    checks, real_check = [], ShardedTable.check
    monkeypatch.setattr(ShardedTable, "check", lambda self: checks.append(1) or real_check(self))
    resumed = score_dimension("complexity", records_out, scorer, progress=False)
    assert len(checks) == 2  # the manifest is checked once to resume (not once per shard) and once to read
    assert resumed.digest == first.digest and resumed.params == first.params  # params come from the tokenizer
    assert resumed.params["complexity_scorer_kind"] == "approximate"
    monkeypatch.undo()

    real_embed, calls = models.embeddings.embed_texts, []

    def dies_on_second_shard(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_embed(*args, **kwargs)

    embedding = DeitaEmbeddingConfig(model=tiny, shard_size=4, max_length=128)
    monkeypatch.setattr(models.embeddings, "embed_texts", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        embed_records(records_out, embedding, progress=False)
    calls.clear()
    monkeypatch.setattr(models.embeddings, "embed_texts", lambda *a, **k: (calls.append(len(a[2])), real_embed(*a, **k))[1])
    out = embed_records(records_out, embedding, progress=False)
    assert calls == [4, 1]  # shard 0 was kept from the killed run
    records = load_canonical(records_out.file("records.jsonl"))
    model, tokenizer = load_model(tiny)
    direct = real_embed(model, tokenizer, [vicuna_text(r, tokenizer.eos_token) for r in records], max_length=128)
    np.testing.assert_allclose(np.load(out.file("embeddings.npy")), direct, atol=1e-5)
    assert out.file("ids.txt").read_text().split() == [r.id for r in records]


def _nothing_selected_error(tmp_path, complexity_rejects, embed_rejects, embedded: int) -> str:
    """select-deita's error over the first 3 Alpaca records when the complexity scorer (and the embedder) left
    out the records the rejects name (`ids` index -> reason) and the embedder embedded the first `embedded`."""
    from tasks.data import load_canonical, prepare_records, write_jsonl
    from tasks.deita import select_deita
    from tasks.store import StageOutput

    records_out = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=3))
    ids = [r.id for r in load_canonical(records_out.file("records.jsonl"))]
    scored, embedded_dir = tmp_path / "complexity", tmp_path / "embed"
    write_jsonl(scored / "scores.jsonl", [])
    write_jsonl(scored / "rejects.jsonl", [{"id": ids[i], "reason": reason} for i, reason in complexity_rejects.items()])
    write_jsonl(embedded_dir / "rejects.jsonl", [{"id": ids[i], "stage": "deita-embed", "reason": reason}
                                                 for i, reason in embed_rejects.items()])
    (embedded_dir / "ids.txt").write_text("\n".join(ids[:embedded]))
    np.save(embedded_dir / "embeddings.npy", np.eye(embedded, 4, dtype=np.float32))
    complexity_out = StageOutput(stage="deita-complexity", key="c", path=str(scored), digest="c")
    embeddings_out = StageOutput(stage="deita-embed", key="e", path=str(embedded_dir), digest="e")
    tiny = ModelConfig(name_or_path="tiny:0")
    selection = DeitaSelection(score="complexity", budget=2, complexity_scorer=DeitaScorerConfig(model=tiny),
                               embedding=DeitaEmbeddingConfig(model=tiny))
    with pytest.raises(ConfigError) as err:
        select_deita(records_out, complexity_out, None, embeddings_out, selection, progress=False)
    return str(err.value)


def test_a_scorer_that_rejects_every_record_fails_the_selection_naming_why(tmp_path):
    too_long = "prompt too long: turn 0 has 90 tokens > 8"
    message = _nothing_selected_error(tmp_path, {0: too_long, 1: too_long, 2: too_long}, {}, embedded=3)
    assert message.startswith(
        f"select-deita: nothing selected from {DATA / 'alpaca_cherry_40.json'} (40 read, 0 rejected, 3 used): the "
        "complexity scorer left no record with a score (prompt too long 3; ")
    assert "raise max_prompt_tokens of selection.complexity_scorer" in message


def test_nothing_selected_counts_each_reason_and_gives_the_fix_of_each(tmp_path):
    """Records left out for a special token's text (one by the complexity scorer, one by the embedder) and one for a
    too-long prompt: the error advised only raising max_prompt_tokens, which changes nothing for the first two."""
    from models.special_tokens import special_token_reason

    message = _nothing_selected_error(
        tmp_path, {0: special_token_reason("<|endoftext|>", "the user message 1"),
                   1: "prompt too long: turn 0 has 90 tokens > 8"},
        {2: special_token_reason("</s>", "the assistant message 2")}, embedded=2)
    assert message == (
        f"select-deita: nothing selected from {DATA / 'alpaca_cherry_40.json'} (40 read, 0 rejected, 3 used): the "
        "complexity scorer and the embedder left no record with a score and an embedding (special token in the "
        "text 2, prompt too long 1; each is listed in the rejects.jsonl of deita-complexity, deita-embed): special "
        "token in the text: the text holds a control token's string (of the tokenizer of "
        "selection.complexity_scorer.model and selection.embedding.model): clean those strings from the data, or "
        "use a model whose tokenizer lacks them; prompt too long: raise max_prompt_tokens of "
        "selection.complexity_scorer, or leave it unset to use the model's context length")


def _fake_scores(tmp_path, name, scores, rejects):
    from tasks.data import write_jsonl
    from tasks.store import StageOutput

    folder = tmp_path / name
    write_jsonl(folder / "scores.jsonl", [{"id": i, "scores": s} for i, s in scores.items()])
    write_jsonl(folder / "rejects.jsonl", [{"id": i, "stage": f"deita-{name}", "reason": r} for i, r in rejects.items()])
    return StageOutput(stage=f"deita-{name}", key=name, path=str(folder), digest=name)


def _fake_embeddings(tmp_path, ids):
    from tasks.store import StageOutput

    folder = tmp_path / "embed"
    folder.mkdir()
    (folder / "ids.txt").write_text("\n".join(ids))
    (folder / "rejects.jsonl").write_text("")  # the embedding stage left out no record
    np.save(folder / "embeddings.npy", np.eye(len(ids), 4, dtype=np.float32))
    return StageOutput(stage="deita-embed", key="e", path=str(folder), digest="e")


def test_select_deita_lists_a_record_both_scorers_refused_once_with_both_reasons(tmp_path):
    from tasks.data import load_canonical, prepare_records, read_jsonl
    from tasks.deita import select_deita

    records_out = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=4))
    a, b, c, d = [r.id for r in load_canonical(records_out.file("records.jsonl"))]
    complexity = _fake_scores(tmp_path, "complexity", {b: [2.0], c: [3.0], d: [4.0]},
                              {a: "prompt too long: turn 0 has 90 tokens > 80"})
    quality = _fake_scores(tmp_path, "quality", {c: [5.0], d: [1.0]},
                           {a: "prompt too long: turn 0 has 190 tokens > 80",
                            b: "prompt too long: turn 0 has 120 tokens > 80"})
    tiny = ModelConfig(name_or_path="tiny:0")
    selection = DeitaSelection(budget=1, complexity_scorer=DeitaScorerConfig(model=tiny),
                               quality_scorer=DeitaScorerConfig(model=tiny), embedding=DeitaEmbeddingConfig(model=tiny))
    out = select_deita(records_out, complexity, quality, _fake_embeddings(tmp_path, [a, b, c, d]), selection,
                       progress=False)
    rejects = read_jsonl(out.file("rejects.jsonl"))
    assert [r["id"] for r in rejects] == [a, b]  # one line per record, input order
    assert rejects[0]["stage"] == "deita-complexity+deita-quality"
    assert rejects[0]["reasons"] == [
        {"stage": "deita-complexity", "reason": "prompt too long: turn 0 has 90 tokens > 80"},
        {"stage": "deita-quality", "reason": "prompt too long: turn 0 has 190 tokens > 80"}]
    assert rejects[0]["reason"] == ("prompt too long: turn 0 has 90 tokens > 80; "
                                    "prompt too long: turn 0 has 190 tokens > 80")
    assert rejects[1]["stage"] == "deita-quality" and len(rejects[1]["reasons"]) == 1
    assert all(r["location"] for r in rejects)
    assert out.metrics["unscored"] == len(rejects) == 2 and out.metrics["candidates"] == 2
    assert out.file("selected_ids.txt").read_text().split() == [c]


def test_select_deita_counts_each_unscored_record_once_in_the_nothing_selected_error(tmp_path):
    from tasks.data import load_canonical, prepare_records
    from tasks.deita import select_deita

    records_out = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=3))
    ids = [r.id for r in load_canonical(records_out.file("records.jsonl"))]
    too_long = {i: "prompt too long: turn 0 has 90 tokens > 8" for i in ids}
    complexity = _fake_scores(tmp_path, "complexity", {}, too_long)
    quality = _fake_scores(tmp_path, "quality", {}, too_long)
    tiny = ModelConfig(name_or_path="tiny:0")
    selection = DeitaSelection(budget=1, complexity_scorer=DeitaScorerConfig(model=tiny),
                               quality_scorer=DeitaScorerConfig(model=tiny), embedding=DeitaEmbeddingConfig(model=tiny))
    with pytest.raises(ConfigError) as err:
        select_deita(records_out, complexity, quality, _fake_embeddings(tmp_path, ids), selection, progress=False)
    assert "left no record with a score (prompt too long 3; " in str(err.value)


def test_select_deita_refuses_a_record_with_no_score_and_no_reject(tmp_path):
    from tasks.data import load_canonical, prepare_records
    from tasks.deita import select_deita

    records_out = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=2))
    a, b = [r.id for r in load_canonical(records_out.file("records.jsonl"))]
    complexity = _fake_scores(tmp_path, "complexity", {a: [2.0]}, {})
    tiny = ModelConfig(name_or_path="tiny:0")
    selection = DeitaSelection(score="complexity", budget=1, complexity_scorer=DeitaScorerConfig(model=tiny),
                               embedding=DeitaEmbeddingConfig(model=tiny))
    with pytest.raises(ValueError, match=f"record {b} .* has no Deita score and no scorer rejected it"):
        select_deita(records_out, complexity, None, _fake_embeddings(tmp_path, [a, b]), selection, progress=False)


# ------------------------------------------------------------------------------------------ end to end
def _multi_turn_file(tmp_path):
    rows = json.loads((DATA / "alpaca_demo_200.json").read_text())[:14]
    convs = [{"conversations": [{"from": "human", "value": r["instruction"] + ("\n" + r["input"] if r["input"] else "")},
                                {"from": "gpt", "value": r["output"][:400]}]} for r in rows]
    # two multi-turn conversations after the single-turn ones
    convs.append({"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."},
                                    {"from": "human", "value": "And times 3?"}, {"from": "gpt", "value": "12."}]})
    convs.append({"conversations": [{"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "Apple."},
                                    {"from": "human", "value": "Another?"}, {"from": "gpt", "value": "Pear."}]})
    path = tmp_path / "convs.json"
    path.write_text(json.dumps(convs))
    return path


def test_deita_flow_end_to_end_on_the_tiny_model(prefect_server, tmp_path, one_torch_thread):
    from flows.deita import deita_flow
    from tasks.data import read_jsonl
    from tasks.track import client

    tiny = ModelConfig(name_or_path="tiny:0")
    config = DeitaFlowConfig(
        name="deita-test", data=DataConfig(path=str(_multi_turn_file(tmp_path))),
        selection=DeitaSelection(
            budget=4, tau=0.9,
            complexity_scorer=DeitaScorerConfig(model=tiny, batch_size=4, shard_size=5),
            quality_scorer=DeitaScorerConfig(model=tiny, batch_size=4, shard_size=5, max_prompt_tokens=300),
            embedding=DeitaEmbeddingConfig(model=tiny, shard_size=5, max_length=256)))
    # a failed stage reruns alone: the scores before it come from the cache
    failed = deita_flow(config, fail_at="deita-embed", return_state=True)
    assert failed.is_failed()
    states = task_states(failed.state_details.flow_run_id)
    assert states["deita-complexity"] == states["deita-quality"] == "Completed"
    assert states["deita-embed"] == "Failed" and "select-deita" not in states
    rerun = deita_flow(config, return_state=True)
    states = task_states(rerun.state_details.flow_run_id)
    assert states["deita-complexity"] == states["deita-quality"] == "Cached"
    assert states["deita-embed"] == states["select-deita"] == "Completed"
    out = rerun.result()
    sel = out["selection"]
    ranking = read_jsonl(sel.file("ranking.jsonl"))
    rejects = read_jsonl(sel.file("rejects.jsonl"))
    selected = sel.file("selected_ids.txt").read_text().split()
    # long responses exceed the quality scorer's 300 tokens: rejected with a reason, never scored by default
    assert rejects and all(r["reason"].startswith("prompt too long") and r["stage"] == "deita-quality" for r in rejects)
    assert len(ranking) + len(rejects) == 16
    assert len(selected) == 4 == sel.metrics["selected"]
    assert sel.metrics["rejected_similar"] == sum(r["status"] == "rejected_similar" for r in ranking)
    assert sel.metrics["examined"] == 4 + sel.metrics["rejected_similar"] <= sel.metrics["candidates"]
    # ranking is by evol score descending; multi-turn records carry one score per turn
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    two_turn = [r for r in ranking if len(r["complexity"]) == 2]
    assert len(two_turn) == 2
    for r in two_turn:
        assert r["score"] == pytest.approx(sum(c * q for c, q in zip(r["complexity"], r["quality"])))
    # the selection is the sequential filter's on the stored embeddings
    emb = np.load(out["embeddings"].file("embeddings.npy"))
    assert json.loads(out["embeddings"].file("embedding-meta.json").read_text())["pooling"] == "last"
    ids = [r["id"] for r in read_jsonl(out["records"].file("records.jsonl"))]
    order = [ids.index(r["id"]) for r in ranking]
    expected = diversity_filter_sequential(emb, order, 0.9, 4)
    assert sorted(ids[i] for i in expected.selected) == sorted(selected)
    # MLflow: the filter's child run has the rejected count, the plots and the subset with its digest
    mlc = client()
    exp = mlc.get_experiment_by_name("deita-test")
    runs = {r.info.run_name: r for r in mlc.search_runs([exp.experiment_id])}
    assert {"deita-complexity", "deita-quality", "deita-embed", "select-deita"} <= set(runs)
    select_run = runs["select-deita"]
    assert select_run.data.metrics["rejected_similar"] == sel.metrics["rejected_similar"]
    logged = {a.path for a in mlc.list_artifacts(select_run.info.run_id)}
    assert {"complexity_vs_quality.png", "score_hist.png", "subset.jsonl"} <= logged
    assert "quality_hist.png" in {a.path for a in mlc.list_artifacts(runs["deita-quality"].info.run_id)}
    assert runs["deita-embed"].data.params["embedding_pooling"] == "last"
    assert runs["deita-complexity"].data.params["complexity_scorer_kind"] == "approximate"
    inputs = select_run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == "deita-subset" and inputs[0].dataset.digest == sel.datasets[0]["digest"]
    # a second run reuses every stage: the selection's folder is not written again
    finished_at = (Path(sel.path) / "_SUCCESS").stat().st_mtime_ns
    again = deita_flow(config)
    assert again["selection"].digest == sel.digest
    assert (Path(sel.path) / "_SUCCESS").stat().st_mtime_ns == finished_at


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_similarity_exactly_at_tau_is_kept_and_one_above_is_not(precision, one_torch_thread):
    # Deita rejects a candidate only when its cosine to a kept sample is > tau: these unit vectors have pairwise
    # cosines of exactly 0.5 (every coordinate is a power of two), so tau = 0.5 keeps all three and any tau below
    # rejects the two after the first.
    x = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, 0.5]], dtype=np.float32)
    assert exact_similarity(x[0], x[1]) == exact_similarity(x[0], x[2]) == exact_similarity(x[1], x[2]) == 0.5
    order = np.array([0, 1, 2])
    for tau, expected in ((0.5, [0, 1, 2]), (0.4999, [0])):
        assert diversity_filter_sequential(x, order, tau, 10).selected.tolist() == expected
        for block in (1, 2, 8):
            fast = diversity_filter(x, order, tau, 10, block_size=block, precision=precision, bound_dims=0)
            assert fast.selected.tolist() == expected, (tau, block)
    # the budget caps the kept set exactly, in ranking order
    assert diversity_filter_sequential(x, order, 0.5, 2).selected.tolist() == [0, 1]
    assert diversity_filter(x, order, 0.5, 2, block_size=8, precision=precision).selected.tolist() == [0, 1]


def test_the_embedding_stage_counts_the_conversations_it_cuts(tiny_model_dir):
    """Long multi-turn ShareGPT conversations are embedded from their first max_length tokens (as Deita's
    embedder): that is counted and said, not left silent."""
    from models.loading import load_tokenizer
    from tasks.data import load_canonical, prepare_records
    from tasks.deita import embed_records, vicuna_text

    records_out = prepare_records(DataConfig(path=str(DATA / "sharegpt_v3_41.json"), on_error="skip"))
    tiny = ModelConfig(name_or_path=str(tiny_model_dir), device="cpu")
    out = embed_records(records_out, DeitaEmbeddingConfig(model=tiny, max_length=512, batch_size=8), progress=False)
    tokenizer = load_tokenizer(tiny)
    lengths = [len(tokenizer(vicuna_text(r, tokenizer.eos_token))["input_ids"])
               for r in load_canonical(records_out.file("records.jsonl"))]
    expected = sum(n > 512 for n in lengths)
    assert 0 < expected < len(lengths) and out.metrics["truncated"] == expected
    assert f"{expected} conversations are longer than max_length 512" in out.summary
    assert json.loads(out.file("embedding-meta.json").read_text())["truncated"] == expected


def test_a_non_finite_score_names_the_record_and_turn_not_a_prompt_index(tiny_model_dir, monkeypatch):
    """The shard scores every turn of its conversations as one flat list; a NaN logit was reported as 'prompts [7]',
    an index into that list, which names no record of the user's file."""
    import models.deita
    from tasks.data import read_records
    from tasks.deita import dimension_rows

    records = read_records(DATA / "sharegpt_v3_41.json", on_error="skip").records[:7]
    turns = [len(r.turns()) for r in records]
    assert max(turns) > 1  # multi-turn, so the flat index and the record differ
    target = next(i for i, n in enumerate(turns) if n > 1)
    flat_index = sum(turns[:target]) + 1  # the target's second turn

    real = models.deita.next_token_logits

    def nan_at_one(*args, **kwargs):
        logits = real(*args, **kwargs)
        logits[flat_index, 2] = float("nan")
        return logits

    scorer = DeitaScorer.load(ModelConfig(name_or_path=str(tiny_model_dir)), "quality")
    monkeypatch.setattr(models.deita, "next_token_logits", nan_at_one)
    with pytest.raises(ScoringError, match=rf"first record {records[target].id} \({records[target].location}\), turn 1;"):
        dimension_rows(scorer, records)


def _alpaca_rows(n: int) -> list[dict]:
    return json.loads((DATA / "alpaca_cherry_40.json").read_text())[:n]


def test_deita_scorers_and_embedding_leave_out_a_record_holding_a_special_tokens_text(tiny_model_dir, tmp_path,
                                                                                      one_torch_thread):
    """The scorer's (embedder's) tokenizer would read '<|end|>' in a reply as its end of turn. The quality scorer
    and the embedding (whose texts hold the reply) leave such a record out, naming the message and the token; the
    complexity scorer (the instruction only) scores it; every other record gets the numbers it gets without it;
    select-deita lists it once with both reasons and never selects it."""
    from tasks.data import load_canonical, prepare_records, read_jsonl
    from tasks.deita import embed_records, score_dimension, select_deita

    clean, dirty = held_copies(tmp_path, _alpaca_rows(7), {3: "output"})
    tiny = ModelConfig(name_or_path=str(tiny_model_dir), device="cpu")
    scorer = DeitaScorerConfig(model=tiny, shard_size=4)
    embedding = DeitaEmbeddingConfig(model=tiny, shard_size=3, max_length=128)
    clean_out, dirty_out = (prepare_records(DataConfig(path=str(p))) for p in (clean, dirty))
    records = load_canonical(dirty_out.file("records.jsonl"))
    held = records[3]
    reason = HELD_REASON.format(where="the assistant message 2")

    complexity = score_dimension("complexity", dirty_out, scorer, progress=False)
    assert complexity.metrics["rejected"] == 0 and complexity.metrics["scored"] == 7
    quality = score_dimension("quality", dirty_out, scorer, progress=False)
    assert read_jsonl(quality.file("rejects.jsonl")) == [
        {"id": held.id, "location": "record 3", "stage": "deita-quality", "reason": reason}]
    assert quality.metrics["rejected[special token in the text]"] == 1 and quality.metrics["scored"] == 6
    before = {r["id"]: r["scores"] for r in read_jsonl(score_dimension("quality", clean_out, scorer,
                                                                       progress=False).file("scores.jsonl"))}
    after = read_jsonl(quality.file("scores.jsonl"))
    assert [r["id"] for r in after] == [r.id for r in records if r.id != held.id]
    for row in after:
        assert row["scores"] == pytest.approx(before[row["id"]], abs=1e-5)

    embedded = embed_records(dirty_out, embedding, progress=False)
    assert read_jsonl(embedded.file("rejects.jsonl")) == [
        {"id": held.id, "location": "record 3", "stage": "deita-embed", "reason": reason}]
    assert embedded.metrics["rejected[special token in the text]"] == 1 and embedded.metrics["embedded"] == 6
    assert embedded.file("ids.txt").read_text().split() == [r.id for r in records if r.id != held.id]
    matrix = np.load(embedded.file("embeddings.npy"))
    reference = np.load(embed_records(clean_out, embedding, progress=False).file("embeddings.npy"))
    assert matrix.shape == (6, reference.shape[1])
    np.testing.assert_allclose(matrix, reference[[0, 1, 2, 4, 5, 6]], atol=1e-5)

    similarities = matrix @ matrix.T
    tau = float(np.median(similarities[np.triu_indices(6, 1)]))  # some candidates are too similar to a kept one
    selection = DeitaSelection(budget=6, tau=tau, complexity_scorer=scorer, quality_scorer=scorer,
                               embedding=embedding)
    out = select_deita(dirty_out, complexity, quality, embedded, selection, progress=False)
    rejects = read_jsonl(out.file("rejects.jsonl"))
    assert [(r["id"], r["stage"]) for r in rejects] == [(held.id, "deita-quality+deita-embed")]
    assert rejects[0]["reasons"] == [{"stage": "deita-quality", "reason": reason},
                                     {"stage": "deita-embed", "reason": reason}]
    assert out.metrics["candidates"] == 6 and out.metrics["unscored"] == 1
    # the filter reads each candidate's own row (the rows after the left-out record moved up by one): the plain
    # loop over the clean records' rows, in the ranking's order, keeps the same records
    ids = embedded.file("ids.txt").read_text().split()
    ranked = [ids.index(r["id"]) for r in read_jsonl(out.file("ranking.jsonl"))]
    expected = diversity_filter_sequential(reference[[0, 1, 2, 4, 5, 6]], ranked, tau, 6).selected.tolist()
    selected = out.file("selected_ids.txt").read_text().split()
    assert 0 < len(selected) < 6 and held.id not in selected
    assert selected == [ids[k] for k in sorted(expected)]


def test_a_deita_stage_where_every_record_holds_a_special_tokens_text_refuses(tiny_model_dir, tmp_path):
    from tasks.data import prepare_records
    from tasks.deita import embed_records, score_dimension

    _, dirty = held_copies(tmp_path, _alpaca_rows(2), {0: "instruction", 1: "instruction"})
    records_out = prepare_records(DataConfig(path=str(dirty)))
    tiny = ModelConfig(name_or_path=str(tiny_model_dir), device="cpu")
    with pytest.raises(ConfigError, match=r"^deita-complexity: all 2 records hold one of the tokenizer's special "
                                          r"tokens as text \(first: the user message 1 holds '<\|end\|>'\)"):
        score_dimension("complexity", records_out, DeitaScorerConfig(model=tiny), progress=False)
    with pytest.raises(ConfigError, match=r"^deita-embed: all 2 records hold one of the tokenizer's special tokens"):
        embed_records(records_out, DeitaEmbeddingConfig(model=tiny, max_length=128), progress=False)
