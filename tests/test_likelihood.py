"""The likelihood engine against the reference's one-sample loop, the templates' exact texts, and resumable scoring."""

from __future__ import annotations

import json
import math

import pytest

from configs.errors import ScoringError
from configs.ifd import ScoringConfig
from configs.schema import DataConfig, ModelConfig
from models.likelihood import (HeadTransform, ScoreRequest, cherry_token_loop_scores, head_nll, head_transform,
                               length_batches, reference_scores, score_requests, split_head)
from models.templates import (SKIP_CHERRY_LENGTH_CHECK, SKIP_EMPTY_OUTPUT, SKIP_INSTRUCTION_TOO_LONG, SKIP_OVERLONG,
                              TEMPLATES, build_pair, instruction_request)
from tests.conftest import DATA

# Real Alpaca rows (Cherry's own 5% subset, tests/data/README.md); 10 of the 40 have an input.
CHERRY_ROWS = json.loads((DATA / "alpaca_cherry_40.json").read_text())


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from models.loading import load_model

    return load_model(ModelConfig(name_or_path=str(tiny_model_dir)))


def _pairs(tokenizer, template, rows, max_length):
    return [build_pair(template, tokenizer, r["instruction"], r.get("input", ""), r["output"], max_length) for r in rows]


@pytest.mark.parametrize("template", TEMPLATES)
def test_engine_agrees_with_one_sample_loop_on_every_sample(tiny, template):
    model, tok = tiny
    rows = CHERRY_ROWS[:8] + [r for r in CHERRY_ROWS if r.get("input")][:4]
    pairs = _pairs(tok, template, rows, max_length=512)
    assert all(p.skip_reason is None for p in pairs)
    assert 0 < sum(p.truncated for p in pairs) < len(pairs)  # both the truncated and the whole path are covered
    requests = [req for p in pairs for req in (p.conditioned, p.direct)]
    engine = score_requests(model, requests, batch_size=5, pad_id=tok.pad_token_id, max_batch_tokens=2048)
    loop = reference_scores(model, requests)
    for i, (a, b) in enumerate(zip(engine, loop)):
        assert a.n_tokens == b.n_tokens == requests[i].n_targets
        assert abs(a.mean_nll - b.mean_nll) < 1e-5, (template, i, a.mean_nll, b.mean_nll)


@pytest.mark.parametrize("template", ["wiz", "superfilter"])
def test_cherrys_per_token_loop_scores_the_same_tokens_as_the_engine(tiny, template):
    # The benchmark's second yardstick must average exactly the answer span (superfilter's direct pass has no BOS:
    # its first token is never scored) and agree with the engine, or its speed-up would compare different work.
    model, tok = tiny
    requests = [req for p in _pairs(tok, template, CHERRY_ROWS[:6], 512) for req in (p.conditioned, p.direct)]
    assert any(r.target_start == 0 for r in requests) == (template == "superfilter")
    engine = score_requests(model, requests, batch_size=4, pad_id=tok.pad_token_id)
    per_token = cherry_token_loop_scores(model, requests)
    for i, (a, b) in enumerate(zip(engine, per_token)):
        assert b.n_tokens == a.n_tokens == requests[i].n_targets
        assert abs(a.mean_nll - b.mean_nll) < 1e-5, (template, i, a.mean_nll, b.mean_nll)


def test_full_logits_path_equals_head_on_targets(tiny):
    model, tok = tiny
    requests = [req for p in _pairs(tok, "alpaca", CHERRY_ROWS[:4], 200) for req in (p.conditioned, p.direct)]
    fast = score_requests(model, requests, batch_size=3, pad_id=tok.pad_token_id)
    full = score_requests(model, requests, batch_size=3, pad_id=tok.pad_token_id, head_on_targets_only=False)
    assert [round(a.nll_sum, 3) for a in fast] == [round(b.nll_sum, 3) for b in full]


@pytest.mark.parametrize("bias, transform", [(False, HeadTransform()), (True, HeadTransform(softcap=30.0)),
                                             (False, HeadTransform(scale=0.125))])
def test_tiled_head_nll_equals_cross_entropy_over_the_whole_vocabulary(bias, transform):
    import torch

    torch.manual_seed(0)
    head = torch.nn.Linear(24, 1000, bias=bias)
    hidden = torch.randn(37, 24) * 3
    # labels on tile edges (0, 127/128, the last id) as well as random ones
    labels = torch.cat([torch.tensor([0, 127, 128, 999, 998]), torch.randint(0, 1000, (32,))])
    with torch.no_grad():
        logits = head(hidden)
        if transform.scale != 1.0:
            logits = logits * transform.scale
        if transform.softcap is not None:
            logits = torch.tanh(logits / transform.softcap) * transform.softcap
        expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        for tile in [(37, None), (8, 128), (5, 333), (100, 1000), (1, 999)]:
            got = head_nll(head, hidden, labels, transform, tile)
            assert torch.allclose(got, expected, atol=1e-5, rtol=0), (tile, (got - expected).abs().max())


def test_head_transform_reads_each_familys_scale_by_model_type():
    from types import SimpleNamespace as Config

    # the same attribute name means opposite operations in two families
    assert head_transform(Config(model_type="granite", logits_scaling=8.0)).scale == 0.125
    assert head_transform(Config(model_type="hyperclovax", logits_scaling=8.0)).scale == 8.0
    assert head_transform(Config(model_type="cohere2", logit_scale=0.0625)).scale == 0.0625
    assert head_transform(Config(model_type="gemma2", final_logit_softcapping=30.0)) == HeadTransform(1.0, 30.0)
    assert head_transform(Config(model_type="llama", logits_scaling=8.0)) == HeadTransform()


def _scaled_head_model(model_type: str):
    """A random two-layer model of a family whose forward rescales the LM head's logits (Granite divides by
    logits_scaling, Cohere multiplies by logit_scale), with scales far from 1 so a missed one shows."""
    import torch
    import transformers

    torch.manual_seed(0)
    shape = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    if model_type == "granite":
        config = transformers.GraniteConfig(logits_scaling=0.25, **shape)
        model = transformers.GraniteForCausalLM(config)
    else:
        config = transformers.CohereConfig(logit_scale=4.0, **shape)
        model = transformers.CohereForCausalLM(config)
    return model.eval()


@pytest.mark.parametrize("model_type, scale", [("granite", 4.0), ("cohere", 4.0)])
def test_engine_applies_the_model_familys_logit_scale(model_type, scale):
    import random
    import warnings

    import torch

    model = _scaled_head_model(model_type)
    body, head, transform = split_head(model)  # the probe against the model's own forward passes
    assert transform.scale == scale
    rng = random.Random(0)
    requests = [ScoreRequest(tuple(rng.randrange(300) for _ in range(n)), n // 3) for n in (9, 40, 17, 64, 33)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tiled head ran: no fallback to the full logits
        engine = score_requests(model, requests, batch_size=2, pad_id=0)
    loop = reference_scores(model, requests)
    assert max(abs(a.mean_nll - b.mean_nll) for a, b in zip(engine, loop)) < 1e-5
    # without the family's scale the numbers are far off: the agreement above is the scale's doing
    with torch.inference_mode():
        unscaled = []
        for r in requests:
            ids = torch.tensor([r.input_ids])
            hidden = body(input_ids=ids).last_hidden_state[0, max(1, r.target_start) - 1:-1]
            unscaled.append(float(head_nll(head, hidden, ids[0, max(1, r.target_start):]).mean()))
    assert max(abs(u - b.mean_nll) for u, b in zip(unscaled, loop)) > 0.05


def test_an_unknown_logit_change_is_refused_by_the_split_and_scored_the_slow_way():
    import random

    model = _scaled_head_model("granite")
    model.config.model_type = "not-a-known-family"  # as a new family with its own scaling would look
    with pytest.raises(ScoringError, match="changes the LM head's logits"):
        split_head(model)
    rng = random.Random(1)
    requests = [ScoreRequest(tuple(rng.randrange(300) for _ in range(n)), 2) for n in (12, 30)]
    with pytest.warns(UserWarning, match="full logits instead"):
        engine = score_requests(model, requests, batch_size=2, pad_id=0)
    loop = reference_scores(model, requests)
    assert max(abs(a.mean_nll - b.mean_nll) for a, b in zip(engine, loop)) < 1e-5


def test_engine_with_small_head_tiles_agrees_with_the_loop(tiny):
    model, tok = tiny
    requests = [req for p in _pairs(tok, "wiz", CHERRY_ROWS[:6], 300) for req in (p.conditioned, p.direct)]
    tiled = score_requests(model, requests, batch_size=4, pad_id=tok.pad_token_id, head_tile=(50, 128))
    loop = reference_scores(model, requests)
    assert max(abs(a.mean_nll - b.mean_nll) for a, b in zip(tiled, loop)) < 1e-5


def test_wiz_texts_spans_and_truncation_follow_the_reference(tiny):
    _, tok = tiny
    row = next(r for r in CHERRY_ROWS if r.get("input"))
    ins, inp, out = row["instruction"], row["input"], row["output"]
    whole = ins + "\nInput:" + inp + "\n\n### Response:" + out
    pair = build_pair("wiz", tok, ins, inp, out, max_length=4096)
    assert list(pair.conditioned.input_ids) == tok.encode(whole)
    # the reference's boundary: the prefix tokenized on its own, BOS included
    assert pair.conditioned.target_start == len(tok.encode(whole[:whole.rfind(out)]))
    direct = "### Response:" + out
    assert list(pair.direct.input_ids) == tok.encode(direct)
    assert pair.direct.target_start == len(tok.encode("### Response:"))
    assert pair.instruction_tokens == len(tok.encode(ins))  # wiz counts the raw instruction, not its input
    # truncation: whole text at max_length, direct text at max_length - instruction tokens + 4
    short = build_pair("wiz", tok, ins, inp, out, max_length=120)
    assert short.truncated and len(short.conditioned.input_ids) == 120
    assert list(short.direct.input_ids) == tok.encode(direct)[:120 - pair.instruction_tokens + 4]


def test_alpaca_superfilter_and_chat_texts(tiny):
    _, tok = tiny
    ins, out = "Name a color.", "Blue is a color."
    alpaca = build_pair("alpaca", tok, ins, "", out, 512)
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nName a color.\n\n### Response:")
    assert tok.decode(alpaca.conditioned.input_ids, skip_special_tokens=True) == prompt + out
    assert alpaca.instruction_tokens == len(tok.encode(prompt))
    plain = build_pair("superfilter", tok, ins, "red", out, 512)
    assert list(plain.conditioned.input_ids) == tok.encode("Name a color.\nred\n" + out)
    assert list(plain.direct.input_ids) == tok.encode(out) and plain.direct.target_start == 0
    assert tok.decode(build_pair("superfilter", tok, ins, "", out, 512).conditioned.input_ids,
                      skip_special_tokens=True) == "Name a color.\n" + out
    chat = build_pair("chat", tok, ins, "", out, 512)
    full = tok.apply_chat_template([{"role": "user", "content": ins}, {"role": "assistant", "content": out}],
                                   tokenize=False)
    turn_tail = full[full.rfind(out):]  # the answer and the template's end-of-turn tokens
    assert turn_tail.startswith(out + "<|end|>")
    assert tok.decode(chat.conditioned.input_ids) == full
    assert tok.decode(chat.conditioned.input_ids[chat.conditioned.target_start:]) == turn_tail
    assert tok.decode(chat.direct.input_ids) == "<|bos|><|assistant|>\n" + turn_tail
    pre = instruction_request("alpaca", tok, ins, "", 512)
    assert list(pre.input_ids) == tok.encode(prompt) and pre.target_start == 0


def test_unscorable_samples_are_skipped_with_a_reason(tiny):
    _, tok = tiny
    long_instruction = "word " * 300
    assert build_pair("wiz", tok, long_instruction, "", "ok", 64).skip_reason == SKIP_INSTRUCTION_TOO_LONG
    assert build_pair("superfilter", tok, long_instruction, "", "ok", 64).skip_reason == SKIP_INSTRUCTION_TOO_LONG
    assert build_pair("alpaca", tok, "hi", "", "", 64).skip_reason == SKIP_EMPTY_OUTPUT
    kept = build_pair("wiz", tok, "hi", "", "answer " * 100, 64)
    assert kept.skip_reason is None and kept.truncated
    assert build_pair("wiz", tok, "hi", "", "answer " * 100, 64, overlong="skip").skip_reason == SKIP_OVERLONG


def test_a_chat_template_that_trims_the_answer_is_named_as_the_skip_reason():
    """Llama-3 style `| trim`: the response's text is not in the rendered conversation (it used to be skipped as
    "empty answer span after truncation", and an answer found inside the user's turn was scored from there)."""
    from models.templates import SKIP_TEMPLATE_ALTERED
    from models.tiny import train_tokenizer

    tok = train_tokenizer()
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}"
                         "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    pair = build_pair("chat", tok, "Say hi", "", "hello world\n", 256)
    assert pair.skip_reason == SKIP_TEMPLATE_ALTERED and pair.conditioned is None
    assert "altered the response text" in SKIP_TEMPLATE_ALTERED
    # the trimmed answer's text does occur, but only in the user's turn
    assert build_pair("chat", tok, "Repeat: ok\n twice", "", "ok\n ", 256).skip_reason == SKIP_TEMPLATE_ALTERED
    assert build_pair("chat", tok, "Say hi", "", "hello world", 256).skip_reason is None


class _WordTokenizer:
    """Splits on spaces, no BOS: "### Response:" is two tokens, so Cherry's length check can fire."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text, add_special_tokens=True, truncation=False, max_length=None):
        ids = [self.vocab.setdefault(word, len(self.vocab)) for word in text.split(" ")]
        return ids[:max_length] if truncation else ids


def test_cherrys_own_length_check_skips_what_it_skips():
    tok = _WordTokenizer()
    output = " ".join(f"w{i}" for i in range(20))
    # 3 instruction tokens; the direct text is cut to 12 - 3 + 4 = 13 tokens, 11 of them answer: 3 + 11 > 12
    pair = build_pair("wiz", tok, "a b c", "", output, max_length=12)
    assert pair.skip_reason == SKIP_CHERRY_LENGTH_CHECK and pair.conditioned is None
    # with room for the whole answer it is scored
    pair = build_pair("wiz", tok, "a b c", "", output, max_length=30)
    assert pair.skip_reason is None and pair.direct.n_targets == 19  # "Response:w0" is one word: the span quirk


def test_non_finite_losses_raise_or_are_returned_never_scored(tiny_model_dir):
    import torch

    from models.loading import load_model
    from tasks.data import read_records
    from tasks.score import STATUS_NONFINITE, score_shard

    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    req = [ScoreRequest(tuple(tok.encode("a short text to score")), 2)]
    with pytest.raises(ScoringError, match="non-finite"):
        score_requests(model, req, pad_id=tok.pad_token_id)
    assert math.isnan(score_requests(model, req, pad_id=tok.pad_token_id, nonfinite="return")[0].nll_sum)
    records = read_records(DATA / "alpaca_cherry_40.json").records[:2]
    rows = score_shard(model, tok, records, 0, ScoringConfig(scorer=ModelConfig(name_or_path="x"), max_length=128))
    assert [r["status"] for r in rows] == [STATUS_NONFINITE] * 2
    assert all(r["cond_mean_nll"] is None and "non-finite" in r["reason"] for r in rows)


def test_auto_token_budget_on_cpu_follows_the_models_width():
    from models.likelihood import batch_token_budget

    assert batch_token_budget("cpu", "auto", 576) == 1024  # SmolLM2-135M: where 1024 was measured best
    assert batch_token_budget("cpu", "auto", 64) == 8192  # the tiny model: 9216 by width, capped
    assert batch_token_budget("cpu", "auto", 192) == 3072
    assert batch_token_budget("cpu", "auto", 4096) == 1024  # wider than measured: never fewer than 1024
    assert batch_token_budget("cpu", "auto", None) == 1024
    assert batch_token_budget("cuda:0", "auto", 64) == 16384
    assert batch_token_budget("cpu", 300, 64) == 300 and batch_token_budget("cpu", None, 64) is None


def test_length_batches_cover_every_request_within_the_token_budget():
    lengths = [5, 90, 12, 40, 41, 7, 88, 3, 60]
    batches = length_batches(lengths, batch_size=3, max_batch_tokens=130)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and max(lengths[i] for i in b) * len(b) <= 130 or len(b) == 1
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


def test_killed_scoring_resumes_at_the_next_shard_with_identical_results(tmp_path, monkeypatch):
    import tasks.score as score_mod
    from tasks.data import prepare_records

    records = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=20))
    scoring = ScoringConfig(scorer=ModelConfig(name_or_path="tiny:0"), template="superfilter", max_length=96,
                            shard_size=4)
    real_shard = score_mod.score_shard
    calls: list[int] = []

    def dies_after_two_shards(model, tokenizer, chunk, first_index, config, progress=False):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-run")
        calls.append(first_index)
        return real_shard(model, tokenizer, chunk, first_index, config)

    monkeypatch.setattr(score_mod, "score_shard", dies_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        score_mod.score_records(records, scoring, progress=False)
    calls_before = list(calls)
    calls.clear()
    monkeypatch.setattr(score_mod, "score_shard", lambda *a, **k: (calls.append(a[3]), real_shard(*a[:5]))[1])
    checks, real_check = [], score_mod.ShardedTable.check
    monkeypatch.setattr(score_mod.ShardedTable, "check", lambda self: checks.append(1) or real_check(self))
    resumed = score_mod.score_records(records, scoring, progress=False)
    assert calls_before == [0, 4] and calls == [8, 12, 16]  # only the unfinished shards ran again
    assert len(checks) == 2  # the manifest is checked once to resume (not once per shard) and once to read
    # the uninterrupted run, in a fresh store
    monkeypatch.setenv("POMONA_HOME", str(tmp_path / "fresh"))
    fresh = score_mod.score_records(records, scoring, progress=False)
    assert fresh.path != resumed.path
    assert score_mod.read_scores(resumed) == score_mod.read_scores(fresh)
    assert resumed.digest == fresh.digest
    assert resumed.metrics["scored"] == 20 and resumed.params["template"] == "superfilter"


def test_multi_turn_records_are_scored_on_their_first_turn_and_counted(tmp_path):
    from models.loading import load_model
    from tasks.data import prepare_records
    from tasks.score import read_scores, score_records

    def turns(*texts):
        return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]

    rows = [{"conversations": turns("Name a colour.", "Blue.", "Another one?", "Green.")},
            {"conversations": turns("What is 2 + 2?", "4.")},
            {"conversations": turns("Say hi.", "Hi!", "Louder.", "HI!", "Thanks.", "Welcome.")}]
    path = tmp_path / "chats.json"
    path.write_text(json.dumps(rows))
    records = prepare_records(DataConfig(path=str(path)))
    out = score_records(records, ScoringConfig(scorer=ModelConfig(name_or_path="tiny:0"), max_length=128),
                        progress=False)
    assert out.metrics["first_turn_only"] == 2 and out.metrics["scored"] == 3
    assert "2 multi-turn records were scored on their first turn only" in out.summary
    _, tok = load_model(ModelConfig(name_or_path="tiny:0"))
    first = build_pair("wiz", tok, "Name a colour.", "", "Blue.", 128)
    assert read_scores(out)[0]["cond_tokens"] == first.conditioned.n_targets


def test_alpaca_rows_with_history_are_counted_as_scored_on_their_last_turn(tmp_path):
    """An Alpaca row's history (as pomona writes a multi-turn ShareGPT record in Alpaca format) is not scored: its
    instruction/output, the last turn, is. The summary said such rows were scored on their first turn."""
    from models.loading import load_model
    from tasks.data import prepare_records, read_records, write_records
    from tasks.score import read_scores, score_records

    chats = tmp_path / "chats.json"
    chats.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Name a colour."},
                                                    {"from": "gpt", "value": "Blue."},
                                                    {"from": "human", "value": "Another one?"},
                                                    {"from": "gpt", "value": "Green."}]}]))
    alpaca = tmp_path / "alpaca.json"
    write_records(read_records(chats).records, alpaca, "alpaca")
    out = score_records(prepare_records(DataConfig(path=str(alpaca))),
                        ScoringConfig(scorer=ModelConfig(name_or_path="tiny:0"), max_length=128), progress=False)
    assert out.metrics["last_turn_only"] == 1 and out.metrics["first_turn_only"] == 0
    assert "1 Alpaca records with a history were scored on their instruction and output only" in out.summary
    assert "first turn" not in out.summary
    _, tok = load_model(ModelConfig(name_or_path="tiny:0"))
    last = build_pair("wiz", tok, "Another one?", "", "Green.", 128)
    assert read_scores(out)[0]["cond_tokens"] == last.conditioned.n_targets


def test_score_rows_hold_the_conditioned_and_direct_losses_each_in_its_own_column(tiny):
    """IFD divides the conditioned loss by the direct one: a row with the two swapped (or a sum where the mean
    belongs) inverts every IFD, so each column is held against the one-sample loop on its own request."""
    from tasks.data import read_records
    from tasks.score import STATUS_SCORED, score_shard

    model, tok = tiny
    records = read_records(DATA / "alpaca_cherry_40.json").records[:3]
    rows = score_shard(model, tok, records, 0, ScoringConfig(scorer=ModelConfig(name_or_path="x"), max_length=512))
    gaps = []
    for record, row in zip(records, rows):
        pair = build_pair("wiz", tok, *record.alpaca_fields(), 512)
        cond, direct = reference_scores(model, [pair.conditioned, pair.direct])
        assert row["status"] == STATUS_SCORED
        assert abs(row["cond_mean_nll"] - cond.mean_nll) < 1e-5 and abs(row["direct_mean_nll"] - direct.mean_nll) < 1e-5
        assert row["cond_tokens"] == cond.n_tokens and row["direct_tokens"] == direct.n_tokens
        assert row["cond_nll_sum"] == pytest.approx(cond.nll_sum, rel=1e-5)
        gaps.append(abs(cond.mean_nll - direct.mean_nll))
    assert max(gaps) > 1e-4  # 10x the tolerance above: a swap of the two columns shows
