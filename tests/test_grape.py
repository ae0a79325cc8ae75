"""GRAPE: candidate ingestion, fit scoring with prefix reuse, selection vs a direct per-candidate loop, DPO pairs,
and the flow end to end (two seeded tiny generators, one failing endpoint) with its MLflow record."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from configs.errors import RecordError
from configs.grape import CandidatesFile, GrapeRecipe, GrapeSelection
from configs.schema import ModelConfig
from models.fit import CandidateGroup, candidate_tokens, fit_plain, fit_with_prefix_reuse
from models.loading import load_model
from tasks.data import read_jsonl, reject_kind
from tasks.generate import read_parquet
from tasks.grape import (
    CandidateFit, dpo_pairs, grape_select, ingest_candidates, rank_candidates, read_candidates_file,
    score_candidate_fit,
)
from tests.conftest import DATA, HELD_REASON, SHARED, held_copies

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


SLICE = DATA / "vicuna_two_models_12.json"
PROMPT_FIELD = {"vicuna": "text", "koala": "prompt", "lima": "conversations", "sinstruct": "instruction",
                "wizardlm": "Instruction"}


# ------------------------------------------------------------------------------------------------ ingestion
@pytest.mark.parametrize("name", sorted(PROMPT_FIELD))
def test_shared_candidate_files_ingest_with_their_prompt_field(name):
    path = SHARED / "candidates" / f"{name}_two_models.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    raw = json.loads(path.read_text())["data"]
    instructions, rows, rejects = read_candidates_file(CandidatesFile(path=str(path)))
    assert len(instructions) + sum(1 for r in rejects if r["field"] is None) == len(raw)
    assert len(rows) == 2 * len(instructions) - sum(1 for r in rejects if r["field"] in ("Answer1", "Answer2"))
    first = instructions[0]
    assert first.messages == [{"role": "user", "content": raw[0][PROMPT_FIELD[name]]}]
    mine = [r for r in rows if r["instruction_id"] == first.id]
    assert [(r["generator"], r["response"]) for r in mine] == [("Answer1", raw[0]["Answer1"]),
                                                               ("Answer2", raw[0]["Answer2"])]
    reasons = Counter(r["reason"] for r in rejects)
    expected = {"koala": {"empty response": 2}, "sinstruct": {"duplicate": 1}, "wizardlm": {"duplicate": 1}}
    for reason, count in expected.get(name, {}).items():
        assert sum(n for k, n in reasons.items() if k.startswith(reason)) == count
    if name not in expected:
        assert not rejects


def test_bundled_slice_labels_limit_and_formats(tmp_path):
    labels = {"Answer1": "cherry-5pct", "Answer2": "alpaca-7b"}
    instructions, rows, rejects = read_candidates_file(CandidatesFile(path=str(SLICE), generator_labels=labels,
                                                                      limit=5))
    assert len(instructions) == 5 and len(rows) == 10 and not rejects
    assert Counter(r["generator"] for r in rows) == {"cherry-5pct": 5, "alpaca-7b": 5}
    # Self-Instruct rows carry their input in instances[0]; UltraFeedback rows list completions.
    sinstruct = tmp_path / "s.json"
    sinstruct.write_text(json.dumps({"Meta_Info": {}, "data": [
        {"instruction": "Fix the grammar.", "instances": [{"input": "he go home", "output": "He goes home."}],
         "Answer1": "He goes home.", "Answer2": "He went home."}]}))
    [inst], rows, _ = read_candidates_file(CandidatesFile(path=str(sinstruct)))
    assert inst.messages[0]["content"] == "Fix the grammar.\n\nhe go home" and len(rows) == 2
    ultra = tmp_path / "u.jsonl"
    ultra.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Name a colour.", "completions": [{"model": "gpt-4", "response": "Blue."},
                                                          {"model": "llama-2-7b-chat", "response": "Red."},
                                                          {"model": "wizardlm-7b", "response": ""}]},
        {"source": "x", "completions": [{"model": "a", "response": "b"}]},
    ]) + "\n")
    [inst], rows, rejects = read_candidates_file(CandidatesFile(path=str(ultra)))
    assert [r["generator"] for r in rows] == ["gpt-4", "llama-2-7b-chat"]
    assert [(r["field"], r["reason"].split(":")[0]) for r in rejects] == [
        ("completions[2].response", "empty response"), (None, "no prompt field")]
    with pytest.raises(RecordError, match=r"u.jsonl, line 1, field 'completions\[2\].response': empty response"):
        read_candidates_file(CandidatesFile(path=str(ultra), on_error="raise"))
    # a broken JSONL line is a reject naming its line (or the error), and the lines after it are still read
    broken = tmp_path / "b.jsonl"
    broken.write_text(ultra.read_text().replace("\n", "\n{not json\n", 1))
    [inst], rows, rejects = read_candidates_file(CandidatesFile(path=str(broken)))
    assert len(rows) == 2 and [(r["location"], r["reason"].split(":")[0]) for r in rejects][0] == ("line 2", "invalid JSON")
    with pytest.raises(RecordError, match=r"b.jsonl, line 2: invalid JSON"):
        read_candidates_file(CandidatesFile(path=str(broken), on_error="raise"))


def test_a_candidates_file_that_is_not_utf8_or_not_an_array_names_its_line(tmp_path):
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"data": [\n{"text": "caf\xe9?", "Answer1": "a", "Answer2": "b"}]}')
    with pytest.raises(RecordError, match=r"latin1.json, line 2: not UTF-8: byte 0xe9"):
        read_candidates_file(CandidatesFile(path=str(latin1), on_error="skip"))
    obj = tmp_path / "obj.json"
    obj.write_text('{"rows": []}')
    with pytest.raises(RecordError, match=r"obj.json, top level: wrong type: expected a JSON array of records \(or "):
        read_candidates_file(CandidatesFile(path=str(obj)))


def test_a_completion_whose_model_is_not_a_name_is_a_reject_not_renamed_by_position(tmp_path):
    # `model: 5` used to become `completion0`, another generator (here clashing with the row's real one)
    path = tmp_path / "u.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Name a colour.", "completions": [{"model": 5, "response": "Blue."},
                                                          {"model": "completion0", "response": "Red."}]},
        {"instruction": "Name a fruit.", "completions": [{"response": "Apple."}, {"model": "", "response": "Pear."}]},
    ]) + "\n")
    with pytest.raises(RecordError, match=r"u.jsonl, line 1, field 'completions\[0\].model': wrong type: expected "
                                          r"a generator name \(a string\), got int"):
        read_candidates_file(CandidatesFile(path=str(path), on_error="raise"))
    instructions, rows, rejects = read_candidates_file(CandidatesFile(path=str(path)))
    assert [r["location"] for r in rejects] == ["line 1"] and len(instructions) == 1
    assert [r["generator"] for r in rows] == ["completion0", "completion1"]  # unnamed: by position


def test_an_answer_field_a_row_lacks_is_a_counted_reject_as_a_null_answer_is(tmp_path):
    # a row without Answer2 used to pass as a one-candidate instruction, with nothing in the rejects
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"Meta_Info": {}, "data": [
        {"instruction": "Name a colour.", "Answer1": "Blue.", "Answer2": "Red."},
        {"instruction": "Name a fruit.", "Answer1": "Apple."},
        {"instruction": "Name a tree.", "Answer1": "Oak.", "Answer2": None}]}))
    instructions, rows, rejects = read_candidates_file(CandidatesFile(path=str(path)))
    assert len(instructions) == 3 and len(rows) == 4
    assert [(r["location"], r["field"], reject_kind(r["reason"])) for r in rejects] == [
        ("record 1", "Answer2", "missing field"), ("record 2", "Answer2", "empty response")]
    with pytest.raises(RecordError, match=r"c.json, record 1, field 'Answer2': missing field: other rows of the file"):
        read_candidates_file(CandidatesFile(path=str(path), on_error="raise"))


def test_generator_labels_must_name_a_generator_of_the_file_and_make_valid_param_names(tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_param_name
    from pydantic import ValidationError

    from configs.errors import ConfigError

    with pytest.raises(ConfigError, match=r"generator_labels: \['answer2'\] name no generator in the first 3 "
                                          r"instructions of .*vicuna_two_models_12.json; its generators are "
                                          r"\['Answer1', 'Answer2'\]"):
        read_candidates_file(CandidatesFile(path=str(SLICE), limit=3, generator_labels={"Answer1": "a",
                                                                                         "answer2": "b"}))
    ultra = tmp_path / "u.jsonl"
    ultra.write_text(json.dumps({"instruction": "Hi.", "completions": [{"model": "gpt-4", "response": "Hello."}]}))
    with pytest.raises(ConfigError, match=r"\['gpt4'\] name no generator .*its generators are \['gpt-4'\]"):
        read_candidates_file(CandidatesFile(path=str(ultra), generator_labels={"gpt4": "g"}))
    # the keys are logged as MLflow param names: those MLflow refuses are refused when the recipe loads
    for key in ("meta-llama/Llama-2 7b", "Answer1", "wizard_lm.v2"):
        CandidatesFile(path="x", generator_labels={key: "label"})
        _validate_param_name(f"selection.candidates.generator_labels.{key}")
    for key in ("llama (7b)", "a/", "a//b", "a/../b", "x,y"):
        with pytest.raises(ValidationError, match="MLflow refuses them in param names"):
            CandidatesFile(path="x", generator_labels={key: "label"})
        with pytest.raises(MlflowException, match="Invalid value"):
            _validate_param_name(f"selection.candidates.generator_labels.{key}")


def _metaspace_tokenizer(chat_template: str):
    """A SentencePiece-style tokenizer (Metaspace: a word-start piece before the first word of a text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    texts = ["Hello world, the sea is blue", "Hello there", "Assistant:Sure thing", "Assistant:Sure"] * 50
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<|end|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", unk_token="<unk>")
    fast.chat_template = chat_template
    return fast


def test_response_tokens_are_those_the_conversation_tokenizes_to():
    """Tokenized on its own, "Hello" gets a word-start piece it never has after the template's newline."""
    tok = _metaspace_tokenizer("{% for m in messages %}[{{ m.role }}]\n{{ m.content }}<|end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant]\n{% endif %}")
    user = [{"role": "user", "content": "hi"}]
    (tokens,) = candidate_tokens(tok, user, ["Hello world"])
    conversation = tok.apply_chat_template(user + [{"role": "assistant", "content": "Hello world"}], tokenize=False)
    ids = tok(conversation.rstrip(), add_special_tokens=False)["input_ids"]
    assert tokens.prompt_ids + tokens.response_ids + tokens.tail_ids == tuple(ids)
    assert tok.convert_ids_to_tokens(tokens.tail_ids) == ["<|end|>"]
    # the fit covers the end-of-turn marker only when asked to
    assert tokens.target_ids(True) == tokens.response_ids + tokens.tail_ids
    assert tokens.target_ids(False) == tokens.response_ids
    alone = tok("Hello world", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone)[0] == "\u2581Hello" and tuple(alone) != tokens.response_ids


def test_a_response_merging_with_the_template_is_rejected_not_scored_on_other_tokens():
    tok = _metaspace_tokenizer("{% for m in messages %}{% if m.role == 'user' %}User:{{ m.content }}\n{% else %}"
                               "Assistant:{{ m.content }}<|end|>\n{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}Assistant:{% endif %}")
    with pytest.raises(RecordError, match="merges with the chat template"):
        candidate_tokens(tok, [{"role": "user", "content": "hi"}], ["Sure thing"], "q1")


# ---------------------------------------------------------------------------------------------- fit scoring
def test_prefix_reuse_equals_one_pass_per_candidate(tiny_model_dir):
    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    prompts = ["What is the capital of France?", "Write a short poem about the sea and the moon, please.", "Hi"]
    answers = [["Paris.", "The capital of France is Paris, a very big city.", "x"], ["Waves roll in.", "Blue sea"],
               ["Hello there, how can I help you today?"]]
    groups = []
    for prompt, responses in zip(prompts, answers):
        tokens = candidate_tokens(tok, [{"role": "user", "content": prompt}], responses)
        groups.append(CandidateGroup(tokens[0].prompt_ids, tuple(t.target_ids(True) for t in tokens)))
    plain = fit_plain(model, groups, batch_size=4, pad_id=tok.pad_token_id)
    for batch_size in (1, 2, 8):
        reused = fit_with_prefix_reuse(model, groups, batch_size=batch_size, pad_id=tok.pad_token_id)
        for a_group, b_group in zip(plain, reused):
            for a, b in zip(a_group, b_group):
                assert a.n_tokens == b.n_tokens
                assert b.nll_sum == pytest.approx(a.nll_sum, rel=1e-5, abs=1e-4)


def _direct_logprobs(model, tok, messages, response) -> list[float]:
    """Independent reference: the log-prob of every token after the prompt (the response, then the end-of-turn
    marker), the whole conversation tokenized at once, one unbatched forward pass."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    ids = tok(full.rstrip(), add_special_tokens=False)["input_ids"]
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    return [logprobs[i - 1, ids[i]].item() for i in range(start, len(ids))]


def _direct_fits(model, tok, messages, response):
    picked = _direct_logprobs(model, tok, messages, response)
    return {"mean_logprob": sum(picked) / len(picked), "sum_logprob": sum(picked),
            "per_byte": sum(picked) / len(response.encode())}


@pytest.fixture(scope="module")
def scored_slice(tiny_model_dir):
    selection = GrapeSelection(target=ModelConfig(name_or_path=str(tiny_model_dir)), scoring_shard_size=4,
                               candidates=CandidatesFile(path=str(SLICE), limit=8), batch_size=3,
                               prefix_reuse=True)  # the stage through its KV-cache path; the loop is the reference
    candidates = ingest_candidates(selection.candidates)
    fit = score_candidate_fit(candidates, selection, progress=False)
    return selection, candidates, fit


def _with(selection: GrapeSelection, **changes) -> GrapeSelection:
    return GrapeSelection.model_validate({**selection.model_dump(), **changes})


@pytest.fixture(scope="module")
def direct_fits(tiny_model_dir):
    """Per slice row, per answer: the fits by every criterion, from the direct loop."""
    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    out = []
    for row in json.loads(SLICE.read_text())["data"][:8]:
        messages = [{"role": "user", "content": row["text"]}]
        out.append((row, messages, [_direct_fits(model, tok, messages, row[k]) for k in ("Answer1", "Answer2")]))
    return out


@pytest.mark.parametrize("criterion", ["mean_logprob", "sum_logprob", "per_byte"])
def test_selection_equals_the_argmax_of_a_direct_per_candidate_loop(scored_slice, direct_fits, criterion):
    selection, candidates, fit = scored_slice
    selection = _with(selection, criterion=criterion)
    out = grape_select(candidates, fit, selection)
    expected = []
    for row, messages, by_answer in direct_fits:
        fits = [f[criterion] for f in by_answer]
        expected.append({"messages": messages + [{"role": "assistant",
                                                  "content": row["Answer1" if fits[0] > fits[1] else "Answer2"]}]})
    assert read_jsonl(out.file("subset.messages.jsonl")) == expected
    table = {(r["instruction_id"], r["candidate_index"]): r for r in read_parquet(out.file("candidate_fit.parquet"))}
    assert len(table) == 16 and sum(r["selected"] for r in table.values()) == 8
    assert out.metrics["wins/Answer1"] + out.metrics["wins/Answer2"] == 8 == out.metrics["selected"]
    for name in ("winners_by_generator.png", "candidate_fit_hist.png", "margin_hist.png", "candidate_fit.parquet"):
        assert name in out.artifacts and out.file(name).stat().st_size > 0
    assert out.datasets[0]["name"] == "grape-subset" and len(out.datasets[0]["digest"]) == 16


def test_fit_rows_match_the_direct_loop_and_count_response_tokens(scored_slice, tiny_model_dir):
    _, candidates, fit = scored_slice
    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    rows = read_parquet(fit.file("fit.parquet"))
    assert fit.metrics["candidates_scored"] == 16 and fit.metrics["shards"] == 2
    responses = {(c["instruction_id"], c["candidate_index"]): c["response"]
                 for c in read_parquet(candidates.file("candidates.parquet"))}
    for row in rows[:4]:
        response = responses[(row["instruction_id"], row["candidate_index"])]
        assert row["response_tokens"] == len(tok(response, add_special_tokens=False)["input_ids"])
        assert row["scored_tokens"] == row["response_tokens"] + row["tail_tokens"] and row["tail_tokens"] == 1
        assert row["response_bytes"] == len(response.encode())
    # the stage is resumable and cached: a second call returns the recorded output
    again = score_candidate_fit(candidates, scored_slice[0], progress=False)
    assert again.reused and not fit.reused and again.digest == fit.digest


def test_without_the_end_of_turn_marker_only_the_response_tokens_are_scored(tiny_model_dir, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"text": "Say hi.", "Answer1": "hi there", "Answer2": "hello, how are you?"}]))
    target = ModelConfig(name_or_path=str(tiny_model_dir))
    selection = GrapeSelection(target=target, score_end_of_turn=False, candidates=CandidatesFile(path=str(path)))
    candidates = ingest_candidates(selection.candidates)
    rows = read_parquet(score_candidate_fit(candidates, selection, progress=False).file("fit.parquet"))
    model, tok = load_model(target)
    messages = [{"role": "user", "content": "Say hi."}]
    for row, response in zip(rows, ["hi there", "hello, how are you?"]):
        assert row["tail_tokens"] == 1 and row["scored_tokens"] == row["response_tokens"]
        # the direct loop's log-probs, all but the last token (the end-of-turn marker)
        expected = -sum(_direct_logprobs(model, tok, messages, response)[:-1])
        assert row["nll_sum"] == pytest.approx(expected, rel=1e-4, abs=1e-4)


def test_too_long_and_empty_candidates_are_rejected_not_scored(tiny_model_dir, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data": [{"text": "Say hi.", "Answer1": "hi", "Answer2": "hello " * 200},
                                         {"text": "Say bye.", "Answer1": "   ", "Answer2": "bye"}]}))
    selection = GrapeSelection(target=ModelConfig(name_or_path=str(tiny_model_dir)), max_length=64,
                               candidates=CandidatesFile(path=str(path)))
    candidates = ingest_candidates(selection.candidates)
    assert candidates.metrics["candidates_rejected"] == 1  # the blank answer, at ingestion
    fit = score_candidate_fit(candidates, selection, progress=False)
    rejects = read_jsonl(fit.file("rejects.jsonl"))
    assert [r["reason"].split(":")[0] for r in rejects] == ["too long"]
    assert fit.metrics["candidates_scored"] == 2
    out = grape_select(candidates, fit, selection)
    assert out.metrics["single_candidate_instructions"] == 2 and out.metrics["selected"] == 2
    # nothing to choose is said, and no margin histogram is drawn from margins that do not exist
    assert "**2 of 2 scored instructions had a single candidate**" in out.summary
    assert "margin_hist.png" not in out.artifacts and not out.file("margin_hist.png").exists()


def test_the_run_log_says_when_grape_had_one_candidate_for_every_instruction(prefect_server, run_log_warnings):
    from prefect import flow

    from flows.grape import warn_single_candidates
    from tasks.store import StageOutput

    warned = run_log_warnings

    @flow
    def select(single: int, scored: int):
        warn_single_candidates(StageOutput(stage="select-grape", key="k", path="/p", digest="0", metrics={
            "single_candidate_instructions": single, "instructions_scored": scored}))

    select(1, 3)
    select(0, 3)
    assert warned == []  # some instructions with one candidate: the summary says it, the log stays quiet
    select(3, 3)
    assert len(warned) == 1 and "every one of the 3 scored instructions had a single candidate" in warned[0]


def test_no_usable_candidate_fails_its_stage_instead_of_selecting_nothing(tiny_model_dir, tmp_path):
    from configs.errors import ConfigError

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"data": []}))
    with pytest.raises(RecordError, match="empty.json, whole file: no usable instruction with candidates: it holds none"):
        ingest_candidates(CandidatesFile(path=str(empty)))
    blank = tmp_path / "blank.json"
    blank.write_text(json.dumps([{"text": "Say hi.", "Answer1": " "}]))
    with pytest.raises(RecordError, match=r"every row was rejected \(empty response 1, no usable candidate response 1; "):
        ingest_candidates(CandidatesFile(path=str(blank)))
    path = tmp_path / "long.json"
    path.write_text(json.dumps([{"text": "Say hi.", "Answer1": "hello " * 40, "Answer2": "hi " * 40}]))
    selection = GrapeSelection(target=ModelConfig(name_or_path=str(tiny_model_dir)), max_length=16,
                               candidates=CandidatesFile(path=str(path)))
    candidates = ingest_candidates(selection.candidates)
    fit = score_candidate_fit(candidates, selection, progress=False)
    with pytest.raises(ConfigError, match=r"grape-fit scored none of the candidate responses of the 1 instructions "
                                          r"\(too long 2; .*raise selection.max_length"):
        grape_select(candidates, fit, selection)


# ------------------------------------------------------------------------------------------ ranking and DPO
def test_tie_break_is_deterministic_and_independent_of_input_order():
    rows = [{"instruction_id": "i", "candidate_index": k, "generator": g, "nll_sum": 6.0, "scored_tokens": 3,
             "response_bytes": 10} for k, g in enumerate(["zeta", "alpha", "mid"])]
    for ordering in (rows, rows[::-1]):
        ranked = rank_candidates(ordering, "mean_logprob")["i"]
        assert [c.generator for c in ranked] == ["alpha", "mid", "zeta"]


def test_dpo_pairs_follow_the_scores_and_the_margin(scored_slice):
    selection, candidates, fit = scored_slice
    out = grape_select(candidates, fit, _with(selection, dpo={"enabled": True, "min_margin": 0.0}))
    pairs, meta = read_jsonl(out.file("pairs.jsonl")), read_jsonl(out.file("pairs_meta.jsonl"))
    ranked = rank_candidates(read_parquet(fit.file("fit.parquet")), "mean_logprob")
    responses = {(c["instruction_id"], c["candidate_index"]): c["response"]
                 for c in read_parquet(candidates.file("candidates.parquet"))}
    assert len(pairs) == len(meta) == out.metrics["dpo_pairs"] == 8
    for pair, info in zip(pairs, meta):
        assert set(pair) == {"prompt", "chosen", "rejected"} and pair["prompt"][-1]["role"] == "user"
        best, worst = ranked[info["instruction_id"]][0], ranked[info["instruction_id"]][-1]
        assert pair["chosen"] == [{"role": "assistant", "content": responses[(best.instruction_id, best.candidate_index)]}]
        assert pair["rejected"][0]["content"] == responses[(worst.instruction_id, worst.candidate_index)]
        assert info["margin"] == pytest.approx(best.fit - worst.fit) and info["margin"] > 0
    margins = sorted(m["margin"] for m in meta)
    strict = grape_select(candidates, fit, _with(selection, dpo={"enabled": True, "min_margin": margins[4]}))
    assert strict.metrics["dpo_pairs"] == 4 and strict.metrics["dpo_skipped[margin]"] == 4
    # a tie or identical texts never make a pair
    ranked = {"a": [CandidateFit("a", 0, "g1", -1.0), CandidateFit("a", 1, "g2", -1.0)],
              "b": [CandidateFit("b", 0, "g1", -1.0), CandidateFit("b", 1, "g2", -2.0)]}
    texts = {("a", 0): "x", ("a", 1): "y", ("b", 0): "same", ("b", 1): "same"}
    pairs, _, skipped = dpo_pairs(ranked, texts, {"a": [], "b": []})
    assert pairs == [] and skipped == {"margin": 1, "identical_texts": 1}


def test_budget_keeps_the_instructions_whose_winner_fits_best(scored_slice):
    selection, candidates, fit = scored_slice
    out = grape_select(candidates, fit, _with(selection, budget=3))
    table = read_parquet(out.file("candidate_fit.parquet"))
    best = sorted((r["fit"] for r in table if r["rank"] == 0), reverse=True)
    kept = sorted((r["fit"] for r in table if r["selected"]), reverse=True)
    assert out.metrics["selected"] == 3 and kept == best[:3]


def test_config_requires_one_candidate_source_and_the_demo_recipe_loads():
    from configs.pipeline import load_recipe
    from tests.conftest import REPO

    demo = load_recipe(REPO / "configs/recipes/grape_vicuna_smollm2.yaml", model=GrapeRecipe)
    assert demo.selection.candidates.path.endswith("vicuna_two_models.json") and demo.selection.dpo.enabled
    target = ModelConfig(name_or_path="tiny:0")
    with pytest.raises(ValueError, match="exactly one of 'generators'"):
        GrapeSelection(target=target)
    with pytest.raises(ValueError, match="need 'data'"):
        GrapeRecipe(name="x", selection={"target": target, "generators": [
            {"name": "g", "model": {"name_or_path": "tiny:1"}}]})


# ------------------------------------------------------------------------------------------------ the flow
def test_flow_two_seeded_tiny_generators_one_failing_endpoint(prefect_server):
    from flows.grape import grape_flow
    from models.generation import GenerationError
    from tasks.track import client

    def recipe(policy: str) -> GrapeRecipe:
        sampling = {"max_new_tokens": 5, "temperature": 0.9, "seed": 1}
        return GrapeRecipe.model_validate({
            "name": "grape-flow-test",
            "data": {"path": str(DATA / "alpaca_cherry_40.json"), "limit": 3},
            "selection": {
                "target": {"name_or_path": "tiny:0"}, "on_generator_failure": policy, "generation_shard_size": 2,
                "dpo": {"enabled": True},
                "generators": [
                    {"name": "tiny1", "model": {"name_or_path": "tiny:1"}, "sampling": sampling},
                    {"name": "tiny2", "model": {"name_or_path": "tiny:2"}, "sampling": sampling},
                    {"name": "down", "backend": "openai", "sampling": sampling,
                     "endpoint": {"base_url": "http://127.0.0.1:9/v1", "model": "m", "max_retries": 0}}]},
            "output_format": "alpaca"})

    with pytest.raises(GenerationError, match=r"1 of 3 generators failed: down: .*rerun to resume"):
        grape_flow(recipe("fail"))
    state = grape_flow(recipe("continue"), return_state=True)
    assert state.is_completed()
    out = state.result()
    cands = read_parquet(out["candidates"].file("candidates.parquet"))
    assert Counter(c["generator"] for c in cands) == {"tiny1": 3, "tiny2": 3}
    by_instruction: dict[str, dict[str, str]] = {}
    for c in cands:
        by_instruction.setdefault(c["instruction_id"], {})[c["generator"]] = c["response"]
    assert any(v["tiny1"] != v["tiny2"] for v in by_instruction.values())  # differently seeded models differ
    assert json.loads(out["candidates"].file("failed_generators.json").read_text()).keys() == {"down"}
    assert out["candidates"].metrics["generators_failed"] == 1 and "down" in out["candidates"].summary
    sel = out["selection"]
    subset = read_jsonl(sel.file("subset.jsonl"))
    assert len(subset) == 3 and set(subset[0]) == {"instruction", "input", "output"}
    winners = {r["instruction_id"]: r["generator"] for r in read_parquet(sel.file("candidate_fit.parquet"))
               if r["selected"]}
    assert {by_instruction[i][g] for i, g in winners.items()} == {r["output"] for r in subset}

    mlc = client()
    exp = mlc.get_experiment_by_name("grape-flow-test")
    runs = mlc.search_runs([exp.experiment_id])
    select = next(r for r in runs if r.data.tags.get("pomona.stage") == "select-grape")
    assert select.data.metrics["wins/tiny1"] + select.data.metrics["wins/tiny2"] == 3
    assert select.data.params["criterion"] == "mean_logprob"
    artifacts = {a.path for a in mlc.list_artifacts(select.info.run_id)}
    assert {"winners_by_generator.png", "candidate_fit_hist.png", "margin_hist.png", "subset.jsonl"} <= artifacts
    names = {d.dataset.name: d.dataset.digest for d in select.inputs.dataset_inputs}
    assert names["grape-subset"] == sel.datasets[0]["digest"]
    assert not math.isnan(select.data.metrics["margin_mean"])
    # the generators that finished in the failed run were reused by the second
    generated = [r for r in runs if r.data.tags.get("pomona.stage", "").startswith("generate-")]
    assert sorted((r.data.tags["pomona.stage"], r.data.tags["pomona.cached"]) for r in generated) == [
        ("generate-tiny1", "false"), ("generate-tiny1", "true"), ("generate-tiny2", "false"), ("generate-tiny2", "true")]


def test_generator_names_with_dots_make_valid_summary_keys():
    # `generate-smollm2-1.7b-summary` is no Prefect artifact key; a finished generator failed on it before
    from prefect.client.schemas.actions import ArtifactCreate

    from tasks.track import artifact_key

    key = artifact_key("generate-SmolLM2-1.7b_summary")
    assert key == "generate-smollm2-1-7b-summary"
    assert ArtifactCreate(key=key, type="markdown", data="x").key == key
    with pytest.raises(ValueError):
        ArtifactCreate(key="generate-smollm2-1.7b-summary", type="markdown", data="x")


def test_bundled_tiny_recipe_runs_offline_and_prefills_the_grape_form(prefect_server, monkeypatch):
    """configs/recipes/grape_tiny.yaml: the Prefect UI's grape form has a recipe that runs as it is (bundled
    candidates, tiny target), from the project folder a deployed run starts in."""
    from configs.pipeline import load_recipe
    from flows.grape import grape_flow
    from flows.serve import recipe_defaults
    from tests.conftest import REPO

    monkeypatch.chdir(REPO)  # the recipe's paths are relative to the project, as in `pomona run`
    recipe = REPO / "configs" / "recipes" / "grape_tiny.yaml"
    assert recipe_defaults(grape_flow, "grape")["config"]["name"] == "grape-tiny"
    config = load_recipe(recipe, GrapeRecipe, overrides={"tracking.enabled": False})
    out = grape_flow(config)
    assert out["candidates"].metrics["candidates"] == 24  # 12 instructions x 2 models
    assert out["fit"].metrics["candidates_rejected"] == 0
    assert out["selection"].metrics["selected"] == 12
    assert len(read_jsonl(out["selection"].file("pairs.jsonl"))) == out["selection"].metrics["dpo_pairs"] > 0


def test_a_candidate_the_generator_could_not_fit_in_its_context_is_rejected_saying_so(tiny_model_dir, tmp_path):
    """A generator skips a conversation longer than its context (finish_reason context_overflow, no text); the fit
    stage's reject must say that, not 'empty response' as if the model had answered nothing."""
    from configs.grape import GeneratorConfig
    from tasks.data import Record
    from tasks.generate import write_candidates
    from tasks.store import StageOutput

    messages = [{"role": "user", "content": "Say hi."}]
    record = Record("i1", messages, "messages", {"messages": messages}, "record 7")
    row = {"instruction_id": "i1", "params": "{}", "seed": 0, "prompt_tokens": 5}
    rows = [{**row, "candidate_index": 0, "generator": "small", "response": "", "response_tokens": 0,
             "finish_reason": "context_overflow"},
            {**row, "candidate_index": 1, "generator": "big", "response": "hi", "response_tokens": 1,
             "finish_reason": "stop"}]
    write_candidates(tmp_path, [record], rows, [])
    candidates = StageOutput(stage="candidates", key="test", path=str(tmp_path), digest="0")
    target = ModelConfig(name_or_path=str(tiny_model_dir))
    selection = GrapeSelection(target=target, generators=[GeneratorConfig(name="small", model=target)])
    fit = score_candidate_fit(candidates, selection, progress=False)
    [reject] = read_jsonl(fit.file("rejects.jsonl"))
    assert reject["location"] == "instruction i1 (record 7)"  # where the user finds it, not only the hash
    assert reject["field"] == "candidate 0 (small)" and reject["reason"].startswith(
        "not generated: the conversation's prompt + max_new_tokens exceed the generator's context")
    assert fit.metrics["rejected[not generated]"] == 1 and fit.metrics["candidates_scored"] == 1


def test_nothing_selected_names_the_reasons_the_candidates_went_and_the_fix_of_each(tiny_model_dir, tmp_path):
    """Every candidate skipped by its generator: the error must say so and point at the generators, not at
    selection.max_length, which would change nothing."""
    from configs.errors import ConfigError
    from configs.grape import GeneratorConfig
    from tasks.data import Record
    from tasks.generate import write_candidates
    from tasks.store import StageOutput

    records, rows = [], []
    for k, finish in enumerate(["context_overflow", "context_overflow", "template_refused", "special_token"]):
        messages = [{"role": "user", "content": f"Say hi {k}."}]
        records.append(Record(f"i{k}", messages, "messages", {"messages": messages}, f"record {k}"))
        rows.append({"instruction_id": f"i{k}", "params": "{}", "seed": 0, "prompt_tokens": 5, "candidate_index": 0,
                     "generator": "small", "response": "", "response_tokens": 0, "finish_reason": finish})
    write_candidates(tmp_path, records, rows, [])
    candidates = StageOutput(stage="candidates", key="all-skipped", path=str(tmp_path), digest="all-skipped")
    target = ModelConfig(name_or_path=str(tiny_model_dir))
    selection = GrapeSelection(target=target, generators=[GeneratorConfig(name="small", model=target)])
    fit = score_candidate_fit(candidates, selection, progress=False)
    with pytest.raises(ConfigError) as err:
        grape_select(candidates, fit, selection)
    message = str(err.value)
    assert message.startswith(
        "select-grape: nothing selected: grape-fit scored none of the candidate responses of the 4 instructions "
        "(not generated (context overflow) 2, not generated (template refused) 1, not generated (special token) 1; "
        "each is listed in ")
    assert "not generated (context overflow): lower the generators' sampling.max_new_tokens" in message
    assert "not generated (template refused): use generators whose chat template accepts" in message
    assert ("not generated (special token): the instruction's text holds a control token's string of the "
            "generator's tokenizer: remove those strings from the data") in message
    reasons = [r["reason"] for r in read_jsonl(fit.file("rejects.jsonl"))]
    assert reasons[3] == ("not generated: a message of the conversation holds one of the generator's special tokens "
                          "as text (finish_reason special_token)")
    assert "max_length" not in message


def test_grape_writes_the_users_sharegpt_rows_back_with_their_own_roles(tiny_model_dir, tmp_path):
    """The winner replaces only the reply's text: `user`/`chatgpt` stay as the user wrote them (they came back as
    `human`/`gpt`)."""
    from configs.grape import GeneratorConfig
    from tasks.data import read_records
    from tasks.generate import write_candidates
    from tasks.store import StageOutput

    row = {"id": "x_0", "conversations": [{"from": "user", "value": "Hi"}, {"from": "chatgpt", "value": "Hello."},
                                          {"from": "user", "value": "Say bye."}, {"from": "chatgpt", "value": "Bye."}]}
    data = tmp_path / "sg.json"
    data.write_text(json.dumps([row]))
    [record] = read_records(data).records
    base = {"instruction_id": record.id, "params": "{}", "seed": 0, "prompt_tokens": 5, "finish_reason": "stop"}
    rows = [{**base, "candidate_index": 0, "generator": "small", "response": "Goodbye.", "response_tokens": 2}]
    write_candidates(tmp_path / "cand", [record], rows, [])
    candidates = StageOutput(stage="candidates", key="sg-roles", path=str(tmp_path / "cand"), digest="sg-roles")
    target = ModelConfig(name_or_path=str(tiny_model_dir))
    selection = GrapeSelection(target=target, generators=[GeneratorConfig(name="small", model=target)])
    out = grape_select(candidates, score_candidate_fit(candidates, selection, progress=False), selection)
    expected = json.loads(json.dumps(row))
    expected["conversations"][-1]["value"] = "Goodbye."
    assert read_jsonl(out.file("subset.jsonl")) == [expected]


def test_a_conversation_the_targets_template_refuses_is_a_reject_not_a_traceback(tiny_model_dir):
    from models.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + tok.chat_template)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    with pytest.raises(RecordError, match=r"instruction i9: template refused: the chat template refuses this "
                                          r"conversation \(roles \['system', 'user'\]\): System role not supported"):
        candidate_tokens(tok, messages, ["hi"], "i9")


def _slice_rows(n: int) -> list[dict]:
    return json.loads(SLICE.read_text())["data"][:n]


def _data_file(rows: list[dict]) -> dict:
    return {"data": rows}


def test_a_candidate_or_instruction_holding_a_special_tokens_text_is_a_reject_the_rest_fit_as_before(tiny_model_dir,
                                                                                                     tmp_path):
    """The target's tokenizer would read '<|end|>' in a response as its end of turn: the fit would be of another
    sequence. Such a candidate is a reject naming it and the token; an instruction holding one rejects each of
    its candidates; the other candidates get the fit they get without them; the template's own '<|end|>' and
    '<|assistant|>' are no reject."""
    clean, dirty = held_copies(tmp_path, _slice_rows(4), [(1, "Answer2"), (2, "text")], wrap=_data_file)
    selection = GrapeSelection(target=ModelConfig(name_or_path=str(tiny_model_dir)), scoring_shard_size=2,
                               candidates=CandidatesFile(path=str(clean)))
    before = score_candidate_fit(ingest_candidates(selection.candidates), selection, progress=False)
    assert before.metrics["candidates_scored"] == 8 and before.metrics["candidates_rejected"] == 0
    before_fit = {(r["instruction_id"], r["candidate_index"]): r for r in read_parquet(before.file("fit.parquet"))}
    selection = _with(selection, candidates=CandidatesFile(path=str(dirty)))
    candidates = ingest_candidates(selection.candidates)
    fit = score_candidate_fit(candidates, selection, progress=False)
    ids = [json.loads(line)["id"] for line in candidates.file("instructions.jsonl").read_text().splitlines()]
    rejects = read_jsonl(fit.file("rejects.jsonl"))
    assert [(r["location"], r["field"], r["reason"]) for r in rejects] == [
        (f"instruction {ids[1]} (record 1)", "candidate 1 (Answer2)", HELD_REASON.format(where="the response")),
        (f"instruction {ids[2]} (record 2)", "candidate 0 (Answer1)", HELD_REASON.format(where="the user message 1")),
        (f"instruction {ids[2]} (record 2)", "candidate 1 (Answer2)", HELD_REASON.format(where="the user message 1"))]
    assert fit.metrics["rejected[special token in the text]"] == 3 and fit.metrics["candidates_scored"] == 5
    rows = read_parquet(fit.file("fit.parquet"))
    assert {(r["instruction_id"], r["candidate_index"]) for r in rows} == {
        (ids[0], 0), (ids[0], 1), (ids[1], 0), (ids[3], 0), (ids[3], 1)}
    for row in rows:
        old = before_fit[(row["instruction_id"], row["candidate_index"])]
        assert row["nll_sum"] == pytest.approx(old["nll_sum"], rel=1e-5, abs=1e-5)
        assert row["scored_tokens"] == old["scored_tokens"] and row["prompt_tokens"] == old["prompt_tokens"]
    out = grape_select(candidates, fit, selection)
    assert out.metrics["instructions_scored"] == 3 and out.metrics["selected"] == 3


def test_every_candidate_holding_a_special_tokens_text_fails_grape_fit_saying_so(tiny_model_dir, tmp_path):
    from configs.errors import ConfigError

    _, dirty = held_copies(tmp_path, _slice_rows(2), [(0, "Answer1"), (0, "Answer2"), (1, "text")], wrap=_data_file)
    selection = GrapeSelection(target=ModelConfig(name_or_path=str(tiny_model_dir)),
                               candidates=CandidatesFile(path=str(dirty)))
    with pytest.raises(ConfigError, match=r"^grape-fit: all 4 candidates hold one of the tokenizer's special tokens "
                                          r"as text \(first: the response holds '<\|end\|>'\)"):
        score_candidate_fit(ingest_candidates(selection.candidates), selection, progress=False)
