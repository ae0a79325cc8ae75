"""IFD maths and selection rules, Cherry's pre-experience picking, facility location, and the IFD stage outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from configs.errors import ConfigError, ScoringError
from configs.ifd import (CherrySelection, DiversityConfig, IFDRule, PreExperienceConfig, ScoringConfig,
                         SuperfilterSelection)
from configs.schema import Budget, DataConfig, ModelConfig
from configs.train import LoraSettings, SFTStageConfig
from tasks.ifd import (band_stride_pick, facility_coverage, facility_location, ifd_scores, ifd_value,
                       pick_pre_experience, select_by_ifd, skip_undefined_ifd)
from tests.conftest import DATA, HELD_REASON, held_copies


def test_the_two_ifd_definitions_rank_differently():
    # (conditioned, direct) mean losses: A has the lower loss ratio, B the lower perplexity ratio
    a, b = (1.0, 2.0), (4.0, 6.0)
    assert ifd_value("cherry", *a) == 0.5 and ifd_value("cherry", *b) == pytest.approx(4 / 6)
    assert ifd_value("superfilter", *a) == pytest.approx(math.exp(1.0) / math.exp(2.0))
    assert ifd_value("superfilter", *b) == pytest.approx(math.exp(4.0) / math.exp(6.0))
    assert (ifd_value("cherry", *a) < ifd_value("cherry", *b)) != (ifd_value("superfilter", *a) < ifd_value("superfilter", *b))


def test_a_zero_direct_loss_is_a_counted_skip_for_cherry_only():
    from tasks.score import score_counts

    def row(i, cond, direct):
        return {"id": i, "status": "scored", "reason": "", "cond_mean_nll": cond, "direct_mean_nll": direct,
                "truncated": False, "seq_tokens": 4}

    rows = [row("a", 1.0, 2.0), row("b", 0.5, 0.0)]
    with pytest.raises(ScoringError, match="exactly 0"):
        ifd_scores(rows, "cherry")
    cherry = skip_undefined_ifd(rows, "cherry")
    assert ifd_scores(cherry, "cherry") == [0.5, None]
    assert cherry[1]["status"] == "skipped" and rows[1]["status"] == "scored"  # the input rows stay as they were
    assert score_counts(cherry)["skipped[direct loss is exactly 0]"] == 1
    # Superfiltering's ratio of perplexities is defined there: exp(0.5 - 0)
    assert ifd_scores(skip_undefined_ifd(rows, "superfilter"), "superfilter")[1] == pytest.approx(math.exp(0.5))


def test_select_by_ifd_threshold_strictness_share_base_and_input_order():
    ids = list("abcdefgh")
    ifd = [0.9, 1.0, 1.2, None, 0.5, 0.95, 0.3, 0.99]  # d could not be scored
    loose = IFDRule(threshold=1.0, strict=False, share_of="filtered")
    chosen, counts = select_by_ifd(ids, ifd, loose, Budget(share=0.5))
    # 6 pass (<= 1, c dropped, d unscored); half of those = 3 highest: b (1.0), h (0.99), f (0.95); input order
    assert chosen == ["b", "f", "h"]
    assert counts == {"ifd_scored": 7, "dropped_above_threshold": 1, "passing_threshold": 6, "share_base": 6, "selected": 3}
    strict = IFDRule(threshold=1.0, strict=True, share_of="all")
    chosen, counts = select_by_ifd(ids, ifd, strict, Budget(share=0.5))
    # strict also drops b; share of all 8 = 4: h, f, a, e
    assert chosen == ["a", "e", "f", "h"] and counts["share_base"] == 8 and counts["dropped_above_threshold"] == 2
    chosen, counts = select_by_ifd(ids, ifd, strict, Budget(budget=100))  # a budget never exceeds what passes
    assert chosen == ["a", "e", "f", "g", "h"] and counts["selected"] == 5  # the count reported is the count kept


def test_why_ifd_kept_nothing_names_the_rule_and_what_to_change():
    from tasks.ifd import why_ifd_kept_nothing

    rows = [{"status": "scored", "reason": ""}] * 2 + [{"status": "skipped", "reason": "too long (900 > 512 tokens)"}]
    why = why_ifd_kept_nothing(rows, [1.2, 0.98765, None], IFDRule(threshold=0.5, strict=True))
    assert why.startswith("the IFD threshold removed all 2 scored samples (none has IFD below "
                          "selection.rule.threshold 0.5; the lowest is 0.9877): raise the threshold above 0.9877")
    assert "at or below" in why_ifd_kept_nothing(rows, [1.2, 0.98765, None], IFDRule(threshold=0.5))
    skipped = [{"status": "skipped", "reason": "too long (900 > 512 tokens)"},
               {"status": "nonfinite", "reason": "non-finite loss (conditioned nan, direct 1.0)"}]
    why = why_ifd_kept_nothing(skipped, [None, None], IFDRule())
    assert why.startswith("no sample could be scored (too long 1, non-finite loss 1; ")
    assert "selection.scoring.max_length" in why


def test_band_stride_pick_strides_over_the_band_in_dataset_order():
    values = np.array([50.0, 1.0, 9.0, 3.0, 7.0, 100.0, 5.0, 2.0, 8.0, 4.0, 6.0, 10.0])
    picked = band_stride_pick(values, per_cluster=3, low=25, high=75)
    lo, hi = np.percentile(values, 25), np.percentile(values, 75)
    band = [i for i, v in enumerate(values) if lo <= v <= hi]  # values 9, 7, 5, 8, 4, 6 at 2, 4, 6, 8, 9, 10
    assert band == [2, 4, 6, 8, 9, 10]
    assert list(picked) == band[::2][:3] == [2, 6, 9]  # stride 6 // 3 = 2 in dataset order, not sorted by value
    # a band smaller than asked: all of it
    assert list(band_stride_pick(values, per_cluster=8, low=25, high=75)) == band
    # a cluster smaller than asked is taken whole, its outliers too (the authors' rule)
    assert list(band_stride_pick(values[:3], 10, 25, 75)) == [0, 1, 2]
    assert list(band_stride_pick(values[:3], 3, 25, 75)) == [2]  # not smaller: the band alone


def test_band_bounds_are_inclusive_and_each_percentile_is_its_own():
    # 0..8 in shuffled dataset order: the 25th/50th/75th percentiles are exactly 2, 4 and 6, so a sample sitting
    # on a bound shows whether the band includes it, and the asymmetric band (25, 50) whether each bound is its own
    values = np.array([6.0, 0.0, 8.0, 2.0, 5.0, 1.0, 4.0, 7.0, 3.0])
    assert (np.percentile(values, 25), np.percentile(values, 50), np.percentile(values, 75)) == (2.0, 4.0, 6.0)
    # band [2, 6] = values 6, 2, 5, 4, 3 at positions 0, 3, 4, 6, 8 (both bounds included)
    assert list(band_stride_pick(values, per_cluster=5, low=25, high=75)) == [0, 3, 4, 6, 8]
    assert list(band_stride_pick(values, per_cluster=2, low=25, high=75)) == [0, 4]  # stride 5 // 2 = 2
    # band [2, 4] = values 2, 4, 3 at positions 3, 6, 8
    assert list(band_stride_pick(values, per_cluster=3, low=25, high=50)) == [3, 6, 8]
    assert list(band_stride_pick(values, per_cluster=1, low=25, high=50)) == [3]


def test_pick_pre_experience_clusters_then_picks_per_cluster():
    rng = np.random.default_rng(0)
    centers = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    emb = np.concatenate([c + rng.normal(size=(20, 2)) for c in centers])
    ppl = rng.uniform(1, 100, size=60)
    picked, labels = pick_pre_experience(emb, ppl, PreExperienceConfig(n_clusters=3, per_cluster=4))
    assert picked == sorted(picked) and len(picked) == 12
    assert sorted(np.bincount(labels).tolist()) == [20, 20, 20]  # one cluster per blob, every instruction labelled
    assert all(len(set(labels[blob * 20:(blob + 1) * 20])) == 1 for blob in range(3))
    assert sorted(np.bincount(np.array(picked) // 20).tolist()) == [4, 4, 4]  # 4 from each blob
    for blob in range(3):
        members = ppl[blob * 20:(blob + 1) * 20]
        lo, hi = np.percentile(members, 25), np.percentile(members, 75)
        assert all(lo <= ppl[i] <= hi for i in picked if i // 20 == blob)
    assert picked == pick_pre_experience(emb, ppl, PreExperienceConfig(n_clusters=3, per_cluster=4))[0]  # fixed seed


def test_facility_location_covers_every_cluster_first():
    rng = np.random.default_rng(1)
    dirs = np.eye(4)
    emb = np.concatenate([d + 0.05 * rng.normal(size=(10, 4)) for d in dirs] + [dirs[0] + 0.05 * rng.normal(size=(30, 4))])
    order = facility_location(emb, 4)
    groups = {0 if i >= 40 else i // 10 for i in order}
    assert groups == {0, 1, 2, 3} and len(set(order)) == 4


@pytest.mark.parametrize("kernel", ["euclidean", "cosine"])
def test_facility_location_is_the_greedy_maximiser_of_its_objective(kernel):
    """Against the definition: each step adds the sample with the largest f(S + j) - f(S), where
    f(S) = sum_i max(0, max_{j in S} sim(i, j)) and sim is the kernel on unit vectors."""
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(60, 8)) + 0.8 * rng.normal(size=(1, 8))
    # and clustered points, where lazy evaluation leaves many bounds stale across steps
    centres = rng.normal(size=(6, 8))
    emb = np.concatenate([emb, centres[rng.integers(0, 6, 240)] + 0.4 * rng.normal(size=(240, 8))])
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    if kernel == "euclidean":  # submodlib's dense euclidean kernel, as the authors call it
        dist = np.sqrt(((unit[:, None, :] - unit[None, :, :]) ** 2).sum(-1))
        sim = np.exp(-dist / unit.shape[1])
    else:
        sim = unit @ unit.T

    def objective(chosen):
        return np.maximum(sim[:, chosen].max(axis=1), 0).sum() if chosen else 0.0

    expected: list[int] = []
    for _ in range(30):
        gains = [objective(expected + [j]) - objective(expected) if j not in expected else -np.inf
                 for j in range(len(emb))]
        expected.append(int(np.argmax(gains)))
    assert facility_location(emb, 30, kernel) == expected
    assert facility_location(emb, 30, kernel, chunk=7, max_kernel_bytes=0) == expected  # columns computed on demand
    # the coverage curve the stage draws is that objective after each pick, over the pool's size
    curve = facility_coverage(emb, expected, kernel, chunk=7)
    assert np.allclose(curve, [objective(expected[:k]) / len(emb) for k in range(1, 31)], rtol=1e-12)
    assert np.all(np.diff(curve) >= 0) and curve[-1] <= 1


def test_the_two_facility_kernels_choose_differently():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(60, 8)) + 0.8 * rng.normal(size=(1, 8))
    assert facility_location(emb, 12, "euclidean") != facility_location(emb, 12, "cosine")


def test_diversity_text_is_the_authors_join():
    from tasks.data import read_records
    from tasks.ifd import diversity_text

    records = read_records(str(DATA / "alpaca_cherry_40.json")).records
    with_input = next(r for r in records if r.source.get("input"))
    empty_input = next(r for r in records if "input" in r.source and not r.source["input"])
    assert diversity_text(with_input) == "\n".join([with_input.source["instruction"], with_input.source["input"],
                                                     with_input.source["output"]])
    # an empty input field still leaves its line, as the authors' join does
    assert diversity_text(empty_input) == empty_input.source["instruction"] + "\n\n" + empty_input.source["output"]


def test_superfiltering_gets_its_own_template_length_and_rule_unless_set():
    scorer = {"scorer": {"name_or_path": "tiny:0"}}
    sel = SuperfilterSelection.model_validate({"budget": 5, "scoring": scorer})
    assert (sel.scoring.template, sel.scoring.max_length) == ("superfilter", 1024)
    sel = SuperfilterSelection.model_validate({"budget": 5, "scoring": {**scorer, "template": "alpaca", "max_length": 256}})
    assert (sel.scoring.template, sel.scoring.max_length) == ("alpaca", 256)
    cherry = CherrySelection.model_validate({"budget": 5, "scoring": scorer})
    assert (cherry.scoring.template, cherry.scoring.max_length) == ("wiz", 512)
    # its rule (ifd < 1, share of all) stays when a recipe sets only part of the rule
    for rule in ({}, {"threshold": 0.9}):
        sel = SuperfilterSelection.model_validate({"budget": 5, "scoring": scorer, **({"rule": rule} if rule else {})})
        assert (sel.rule.strict, sel.rule.share_of) == (True, "all")
    sel = SuperfilterSelection.model_validate({"budget": 5, "scoring": scorer, "rule": {"strict": False}})
    assert (sel.rule.strict, sel.rule.share_of) == (False, "all")
    assert (cherry.rule.strict, cherry.rule.share_of) == (False, "filtered")
    # section objects built with the shared classes count by what they set, as mappings do (they took Cherry's)
    sel = SuperfilterSelection(budget=5, scoring=ScoringConfig(scorer=ModelConfig(name_or_path="tiny:0"),
                                                                max_length=96), rule=IFDRule(threshold=0.9))
    assert (sel.scoring.template, sel.scoring.max_length, sel.rule.strict, sel.rule.share_of) == (
        "superfilter", 96, True, "all")
    # the schema the Prefect form renders shows these defaults: a form that sends every value runs Superfiltering
    schema = SuperfilterSelection.model_json_schema()["$defs"]
    assert schema["SuperfilterScoring"]["properties"]["template"]["default"] == "superfilter"
    assert schema["SuperfilterScoring"]["properties"]["max_length"]["default"] == 1024
    assert schema["SuperfilterRule"]["properties"]["share_of"]["default"] == "all"
    form = SuperfilterSelection.model_validate({"budget": 5, "scoring": scorer}).model_dump(mode="json")
    assert SuperfilterSelection.model_validate(form).scoring.template == "superfilter"


def test_configs_refuse_invalid_combinations():
    scoring = ScoringConfig(scorer=ModelConfig(name_or_path="tiny:0"))
    with pytest.raises(ValidationError, match="exactly one"):
        CherrySelection(scoring=scoring)
    with pytest.raises(ValidationError, match="band"):
        PreExperienceConfig(band=(75, 25))
    with pytest.raises(ValidationError, match="merge_adapter"):
        PreExperienceConfig(sft=SFTStageConfig(lora=LoraSettings()))
    with pytest.raises(ValidationError, match="diversity.budget"):
        SuperfilterSelection(scoring=scoring, budget=10, diversity=DiversityConfig(budget=20))
    assert SuperfilterSelection(scoring=scoring, share=0.1).rule.strict is True


def test_ifd_and_diversity_stages_write_subset_histogram_and_counts():
    from tasks.data import prepare_records, read_jsonl
    from tasks.ifd import diversity_selection, ifd_selection
    from tasks.score import score_records

    records = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=24))
    scoring = ScoringConfig(scorer=ModelConfig(name_or_path="tiny:0"), template="superfilter", max_length=300,
                            shard_size=12)
    scores = score_records(records, scoring, progress=False)
    selection = SuperfilterSelection(scoring=scoring, budget=8, diversity=DiversityConfig(budget=3, max_length=128))
    out = ifd_selection(records, scores, selection)
    rows = read_jsonl(out.file("ifd_scores.jsonl"))
    kept = [r for r in rows if r["selected"]]
    assert len(kept) == out.metrics["selected"] == min(8, out.metrics["passing_threshold"])
    assert all(r["ifd"] < 1 for r in kept)
    assert min(r["ifd"] for r in kept) >= max(r["ifd"] for r in rows if not r["selected"] and r["ifd"] < 1)
    assert out.file("selected_ids.txt").read_text().split() == [r["id"] for r in kept]  # input order
    assert out.file("ifd_histogram.png").stat().st_size > 0 and "ifd_histogram.png" in out.artifacts
    assert out.metrics["truncated"] > 0 and out.metrics["scored"] + out.metrics["skipped"] == 24
    assert out.params["scorer"] == "tiny:0" and out.params["template"] == "superfilter"
    assert out.datasets and out.datasets[0]["file"] == "subset.messages.jsonl"
    diverse = diversity_selection(records, out, selection)
    picked = diverse.file("selected_ids.txt").read_text().split()
    assert len(picked) == 3 and set(picked) <= {r["id"] for r in kept}
    # a threshold below every IFD fails the stage naming the data file, its counts and the rule (no empty subset)
    lowest = min(r["ifd"] for r in rows)
    too_strict = SuperfilterSelection(scoring=scoring, budget=8, rule=IFDRule(threshold=lowest / 2))
    with pytest.raises(ConfigError) as err:
        ifd_selection(records, scores, too_strict)
    assert str(err.value).startswith(f"select-superfilter: nothing selected from {DATA / 'alpaca_cherry_40.json'} "
                                     "(40 read, 0 rejected, 24 used): the IFD threshold removed all 24 scored")


def test_instruction_profile_resumes_from_its_shards_and_equals_one_pass(tiny_model_dir, monkeypatch,
                                                                        one_torch_thread):
    """cherry-instructions is written shard by shard: a killed run keeps its finished shards, and the stage's
    perplexities and embeddings equal one unsharded pass over all instructions."""
    import tasks.ifd
    from models.loading import load_model
    from tasks.data import load_canonical, prepare_records, read_jsonl
    from tasks.ifd import instruction_profile

    records_out = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=10))
    scoring = ScoringConfig(scorer=ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"), max_length=256,
                            shard_size=4)
    pre = PreExperienceConfig(embed_batch_size=3)
    real, calls, killed = tasks.ifd.profile_shard, [], []

    def dies_on_second_shard(model, tokenizer, records, *args):
        calls.append([r.id for r in records])
        if len(calls) == 2 and not killed:
            killed.append(True)
            raise KeyboardInterrupt("killed")
        return real(model, tokenizer, records, *args)

    monkeypatch.setattr(tasks.ifd, "profile_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        instruction_profile(records_out, scoring, pre, progress=False)
    first_shard = calls[0]
    calls.clear()
    out = instruction_profile(records_out, scoring, pre, progress=False)
    records = load_canonical(records_out.file("records.jsonl"))
    assert [len(c) for c in calls] == [4, 2] and first_shard not in calls  # shard 0 kept from the killed run

    model, tokenizer = load_model(scoring.scorer)
    rows, embeddings = real(model, tokenizer, records, scoring, pre)
    assert [r["id"] for r in read_jsonl(out.file("perplexity.jsonl"))] == [r["id"] for r in rows] == [r.id for r in records]
    assert np.allclose([r["perplexity"] for r in read_jsonl(out.file("perplexity.jsonl"))],
                       [r["perplexity"] for r in rows], rtol=1e-5)
    stored = np.load(out.file("embeddings.npy"))
    assert stored.shape == (10, 64) and np.allclose(stored, embeddings, atol=1e-5)
    assert out.metrics == {"instructions": 10, "profiled": 10, "skipped": 0}


@pytest.mark.parametrize("template", ["wiz", "chat"])
def test_instruction_embedding_is_the_mean_state_over_the_tokens_whose_perplexity_is_measured(tiny_model_dir,
                                                                                                template):
    """As the reference takes both from one pass: one BOS under a chat template that writes its own."""
    import torch

    from models.loading import load_model
    from models.templates import instruction_request
    from tasks.data import load_canonical, prepare_records
    from tasks.ifd import profile_shard

    records = load_canonical(prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=3))
                             .file("records.jsonl"))
    scoring = ScoringConfig(scorer=ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"), template=template,
                            max_length=256)
    model, tokenizer = load_model(scoring.scorer)
    _, embeddings = profile_shard(model, tokenizer, records, scoring, PreExperienceConfig(embed_batch_size=2))
    for record, embedding in zip(records, embeddings):
        ids = instruction_request(template, tokenizer, *record.alpaca_fields()[:2], 256).input_ids
        assert ids.count(tokenizer.bos_token_id) == 1
        with torch.inference_mode():
            states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        assert np.allclose(embedding, states.mean(0).numpy(), atol=1e-5)


@pytest.mark.parametrize("template", ["wiz", "alpaca", "superfilter", "chat"])
def test_pre_experience_trains_on_the_text_ifd_is_scored_on(tiny_model_dir, template):
    """The authors pre-experience the scorer on the template's own text, loss on the output (Stanford Alpaca's
    training script); a chat template trains on messages."""
    from models.loading import load_tokenizer
    from models.templates import build_pair
    from tasks.data import read_records
    from tasks.ifd import pre_experience_rows

    records = read_records(str(DATA / "alpaca_cherry_40.json")).records
    records = [r for r in records if r.alpaca_fields()[1]][:3] + [r for r in records if not r.alpaca_fields()[1]][:3]
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    rows = pre_experience_rows(records, template)
    for record, row in zip(records, rows):
        if template == "chat":
            assert row == {"messages": record.messages}
            continue
        pair = build_pair(template, tokenizer, *record.alpaca_fields(), max_length=4096)
        assert tokenizer.encode(row["prompt"] + row["completion"]) == list(pair.conditioned.input_ids)
        assert row["completion"] == record.alpaca_fields()[2]


def test_pre_experience_says_which_picked_samples_truncation_left_untrained(tmp_path):
    """Cherry's pre-experience SFT on real ShareGPT first turns: a picked sample whose long instruction fills
    pre_experience.sft.max_length has no answer token left and TRL drops it; the stage said 'on N samples' with
    N the trained ones and nothing about the others."""
    import json

    from tasks.data import read_records, write_jsonl
    from tasks.ifd import PRE_EXPERIENCE_TRAIN, pre_experience_rows, pre_experience_sft
    from tasks.store import StageOutput

    records = read_records(DATA / "sharegpt_v3_41.json", on_error="skip").records[:12]
    pick = tmp_path / "pick"
    write_jsonl(pick / PRE_EXPERIENCE_TRAIN, pre_experience_rows(records, "wiz"))
    pick_out = StageOutput(stage="cherry-pick", key="test", path=str(pick), digest="0")
    pre = PreExperienceConfig(sft=SFTStageConfig(max_steps=1, per_device_train_batch_size=4, max_length=96,
                                                 register_model=False))
    out = pre_experience_sft(pick_out, ScoringConfig(scorer=ModelConfig(name_or_path="tiny:0")), pre)
    rejects = [json.loads(line) for line in out.file("train/train_rejects.jsonl").read_text().splitlines()]
    assert out.metrics["examples_given"] == 12 and out.metrics["examples_dropped_truncated"] == len(rejects) > 0
    assert out.metrics["examples"] == 12 - len(rejects) and "train/train_rejects.jsonl" in out.artifacts
    assert f"{len(rejects)} of the 12 picked had no answer token left" in out.summary


def test_the_same_pre_experience_sft_in_two_homes_has_one_digest(tmp_path, monkeypatch):
    """The trainer pickles its output folder (in the home) into training_args.bin: the cherry-sft digest covered
    it, so the same weights trained in another home (a fresh home, a compose worker's volume) were another input
    to the score stage, which computed again under another key."""
    from tasks.data import read_records, write_jsonl
    from tasks.ifd import PRE_EXPERIENCE_TRAIN, pre_experience_rows, pre_experience_sft
    from tasks.store import StageOutput

    pick = tmp_path / "pick"
    write_jsonl(pick / PRE_EXPERIENCE_TRAIN, pre_experience_rows(
        read_records(DATA / "alpaca_cherry_40.json").records[:4], "wiz"))
    pick_out = StageOutput(stage="cherry-pick", key="test", path=str(pick), digest="0")
    pre = PreExperienceConfig(sft=SFTStageConfig(max_steps=1, per_device_train_batch_size=2, max_length=64,
                                                 register_model=False))
    outs = []
    for home in ("home-a", "home-b"):
        monkeypatch.setenv("POMONA_HOME", str(tmp_path / home))
        outs.append(pre_experience_sft(pick_out, ScoringConfig(scorer=ModelConfig(name_or_path="tiny:0")), pre))
    assert outs[0].key == outs[1].key and outs[0].path != outs[1].path
    assert outs[0].digest == outs[1].digest


def _alpaca_rows(n: int) -> list[dict]:
    return json.loads((DATA / "alpaca_cherry_40.json").read_text())[:n]


def test_a_sample_holding_a_special_tokens_text_is_a_counted_reject_and_the_others_score_as_before(tmp_path):
    """The scorer's tokenizer would read '<|end|>' in a reply as its end-of-turn token: the score would be of
    another sequence than the text. Such a sample is skipped with the field and token named, counted, and listed;
    every other sample gets the numbers it gets without it in the data."""
    from tasks.data import prepare_records, read_jsonl
    from tasks.score import STATUS_SCORED, read_scores, score_records

    clean, dirty = held_copies(tmp_path, _alpaca_rows(6), {2: "output", 4: "input"})
    scoring = ScoringConfig(scorer=ModelConfig(name_or_path="tiny:0"), template="wiz", max_length=256, shard_size=4)
    before = {r["id"]: r for r in read_scores(score_records(prepare_records(DataConfig(path=str(clean))), scoring,
                                                            progress=False))}
    out = score_records(prepare_records(DataConfig(path=str(dirty))), scoring, progress=False)
    rows = read_scores(out)
    skipped = [r for r in rows if r["status"] != STATUS_SCORED]
    assert [(r["index"], r["reason"]) for r in skipped] == [(2, HELD_REASON.format(where="field 'output'")),
                                                             (4, HELD_REASON.format(where="field 'input'"))]
    assert all(r["cond_nll_sum"] is None and r["direct_nll_sum"] is None for r in skipped)
    assert [(r["location"], r["reason"]) for r in read_jsonl(out.file("rejects.jsonl"))] == [
        ("record 2", skipped[0]["reason"]), ("record 4", skipped[1]["reason"])]
    assert out.metrics["skipped[special token in the text]"] == 2 and out.metrics["scored"] == 4
    assert "2 hold one of the scorer's special tokens" in out.summary
    scored = [r for r in rows if r["status"] == STATUS_SCORED]
    assert len(scored) == 4 and all(r["id"] in before for r in scored)  # unchanged records, unchanged ids
    for row in scored:
        for column in ("cond_nll_sum", "cond_tokens", "direct_nll_sum", "direct_tokens", "instruction_tokens"):
            assert row[column] == pytest.approx(before[row["id"]][column], rel=1e-5, abs=1e-6), column


def test_a_chat_templates_own_special_tokens_are_not_a_reject_and_all_samples_held_is_an_error(tmp_path):
    """Under the chat template the rendered text is full of '<|user|>', '<|end|>': only the user's own texts
    count. When every sample holds a special token's text the stage refuses, naming the first and the file."""
    from tasks.data import prepare_records
    from tasks.score import score_records

    clean, dirty = held_copies(tmp_path, _alpaca_rows(3), {0: "output", 1: "instruction", 2: "output"})
    scoring = ScoringConfig(scorer=ModelConfig(name_or_path="tiny:0"), template="chat", max_length=256)
    assert score_records(prepare_records(DataConfig(path=str(clean))), scoring, progress=False).metrics["scored"] == 3
    with pytest.raises(ConfigError, match=r"^score: all 3 samples hold one of the tokenizer's special tokens as text "
                                          r"\(first: field 'output' holds '<\|end\|>'\), so none can be scored as "
                                          r"written; each is listed in .*rejects.jsonl"):
        score_records(prepare_records(DataConfig(path=str(dirty))), scoring, progress=False)


def test_cherry_instructions_leave_out_an_instruction_holding_a_special_tokens_text(tmp_path, tiny_model_dir):
    """cherry-instructions scores the instruction (and input) alone: one holding '<|end|>' is a counted reject;
    a reply holding it is not this stage's text (the score stage and training refuse it)."""
    from tasks.data import load_canonical, prepare_records, read_jsonl
    from tasks.ifd import instruction_profile

    clean, dirty = held_copies(tmp_path, _alpaca_rows(6), {1: "instruction", 3: "output"})
    scoring = ScoringConfig(scorer=ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"), max_length=256,
                            template="alpaca")
    pre = PreExperienceConfig(embed_batch_size=3)
    before = instruction_profile(prepare_records(DataConfig(path=str(clean))), scoring, pre, progress=False)
    records_out = prepare_records(DataConfig(path=str(dirty)))
    out = instruction_profile(records_out, scoring, pre, progress=False)
    held = load_canonical(records_out.file("records.jsonl"))[1]
    assert read_jsonl(out.file("rejects.jsonl")) == [
        {"id": held.id, "location": "record 1", "reason": HELD_REASON.format(where="field 'instruction'")}]
    assert out.metrics == {"instructions": 6, "profiled": 5, "skipped": 1, "skipped[special token in the text]": 1}
    old = {r["id"]: r["perplexity"] for r in read_jsonl(before.file("perplexity.jsonl"))}
    new = read_jsonl(out.file("perplexity.jsonl"))
    assert len(new) == 5 and held.id not in {r["id"] for r in new}
    # the row whose reply changed keeps its instruction, so its perplexity; the others are the same records
    assert [r["perplexity"] for r in new] == pytest.approx([p for i, p in enumerate(old.values()) if i != 1], rel=1e-5)
    kept = [i for i in range(6) if i != 1]
    assert np.allclose(np.load(out.file("embeddings.npy")), np.load(before.file("embeddings.npy"))[kept], atol=1e-5)


def test_diversity_step_leaves_out_a_sample_holding_the_embedders_special_tokens_text(tmp_path):
    """Superfiltering.D embeds instruction + input + output with its embedder (any model, not the scorer that
    screened the IFD step): a sample whose text holds one of that embedder's special tokens ('<|end|>' of the tiny
    tokenizer, standing in for '<|endoftext|>') was embedded as that control token. It is left out of the step,
    listed with the field and token, counted; the others are embedded as without it. All of them: a ConfigError."""
    from tasks.data import prepare_records, read_jsonl
    from tasks.ifd import diversity_selection
    from tasks.store import StageOutput

    rows = json.loads((DATA / "alpaca_cherry_40.json").read_text())[:5]
    rows[2]["output"] += " Skipped 1 messages<|end|>"
    (tmp_path / "held.json").write_text(json.dumps(rows))
    records = prepare_records(DataConfig(path=str(tmp_path / "held.json")))
    ids = [r["id"] for r in read_jsonl(records.file("records.jsonl"))]
    ifd = tmp_path / "ifd"
    ifd.mkdir()
    (ifd / "selected_ids.txt").write_text("\n".join(ids) + "\n")
    ifd_out = StageOutput(stage="select-superfilter", key="held", path=str(ifd), digest="held")
    scoring = ScoringConfig(scorer=ModelConfig(name_or_path="tiny:1"), template="superfilter")
    selection = SuperfilterSelection(scoring=scoring, budget=5, diversity=DiversityConfig(
        budget=4, max_length=128, embedder=ModelConfig(name_or_path="tiny:0")))
    out = diversity_selection(records, ifd_out, selection)
    assert read_jsonl(out.file("rejects.jsonl")) == [{
        "id": ids[2], "location": "record 2",
        "reason": "special token in the text: field 'output' holds '<|end|>', which the tokenizer would read as that "
                  "control token, not as text"}]
    assert out.metrics["diversity_special_tokens"] == 1 and out.metrics["diversity_embedded"] == 4
    assert out.metrics["ifd_selected"] == 5
    picked = out.file("selected_ids.txt").read_text().split()
    assert len(picked) == 4 and ids[2] not in picked
    assert "1 of the 5 hold one of the embedder's special tokens" in out.summary

    for row in rows:
        row["instruction"] += "<|end|>"
    (tmp_path / "all.json").write_text(json.dumps(rows))
    records = prepare_records(DataConfig(path=str(tmp_path / "all.json")))
    (ifd / "selected_ids.txt").write_text("".join(r["id"] + "\n" for r in read_jsonl(records.file("records.jsonl"))))
    ifd_out = StageOutput(stage="select-superfilter", key="all", path=str(ifd), digest="all")
    with pytest.raises(ConfigError, match=r"^select-superfilter-d: all 5 IFD-selected samples hold one of the "
                                          r"tokenizer's special tokens as text \(first: field 'instruction' holds"):
        diversity_selection(records, ifd_out, selection)


@pytest.mark.parametrize("spread", [1.1, 1000.0])
def test_pre_experience_figure_draws_narrow_and_decade_spanning_perplexities(tmp_path, spread):
    """A random model's perplexities sit in a narrow band (linear axis), a real model's span decades (log axis)."""
    from PIL import Image

    from tasks.plots import histogram, pre_experience_figure

    ppl = np.geomspace(10.0, 10.0 * spread, 200)
    sizes, picked = np.array([120, 50, 30]), np.array([10, 10, 10])
    path = pre_experience_figure(sizes, picked, ppl, ppl[80:110], tmp_path / "pre.png", "title")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1100, 400)
    # the selection histograms draw the picks over all values the same way
    hist = histogram(ppl, tmp_path / "hist.png", "title", "x", threshold=12.0, selected=ppl[80:110])
    with Image.open(hist) as image:
        assert image.format == "PNG" and image.size == (600, 400)
