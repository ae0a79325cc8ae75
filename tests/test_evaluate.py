"""Evaluation: the judge's order swapping, Deita quality formula, the HumanEval sandbox and pass@1, and each
evaluation stage on the tiny model with small local files."""

from __future__ import annotations

import json
from pathlib import Path
import math
import os
import time
from types import SimpleNamespace

import pytest

from configs.evaluate import (BaselineAnswersFile, EvaluateConfig, EvaluateFlowConfig, GenerationSettings,
                              HeldoutLikelihoodConfig, HumanEvalConfig, InstructionEvalConfig, JudgeConfig,
                              LmEvalConfig)
from configs.schema import DataConfig, ModelConfig, TrackingConfig
from tests.conftest import DATA, SHARED, task_states

# ------------------------------------------------------------------------------------------- fake judges


class ScriptedJudge:
    """A stand-in judge model: next-token logits come from a rule over the decoded prompt; prompts are recorded."""

    def __init__(self, tokenizer, rule):
        import torch

        self.tokenizer = tokenizer
        self.rule = rule
        self.seen: list[str] = []
        self.param = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.forward = self.__call__

    def parameters(self):
        yield self.param

    def __call__(self, input_ids, attention_mask):
        import torch

        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], len(self.tokenizer))
        for row in range(input_ids.shape[0]):
            n = int(attention_mask[row].sum())
            text = self.tokenizer.decode(input_ids[row, :n].tolist())
            self.seen.append(text)
            for token, value in self.rule(text).items():
                logits[row, n - 1, self.tokenizer.convert_tokens_to_ids(token)] = value
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def tokenizer():
    from models.tiny import train_tokenizer

    return train_tokenizer()


def _judge(tokenizer, rule, **kw):
    from models.judge import LogitJudge

    fake = ScriptedJudge(tokenizer, rule)
    return LogitJudge(fake, tokenizer, name="scripted", batch_size=3, **kw), fake


QUESTIONS = ["What is the capital of France?", "Give three tips for staying healthy.", "Write a short poem."]
CANDIDATES = ["Paris is the capital.", "Eat well, exercise, sleep.", "The waves roll in."]
BASELINES = ["I do not know.", "Be healthy.", "Sea."]


def test_pairwise_judges_both_orders_and_a_position_biased_judge_ties(tokenizer):
    judge, fake = _judge(tokenizer, lambda text: {"1": 4.0, "2": 0.0})  # always "Response 1 is better"
    verdicts = judge.pairwise(QUESTIONS, CANDIDATES, BASELINES)

    assert [v.outcome for v in verdicts] == ["tie", "tie", "tie"]
    for v in verdicts:
        assert v.p_candidate_first > 0.9 and v.p_candidate_second < 0.1
    # Each pair was shown once with the candidate first and once with the baseline first.
    assert len(fake.seen) == 2 * len(QUESTIONS)
    for cand, base in zip(CANDIDATES, BASELINES):
        first = [t for t in fake.seen if f"[Response 1]\n{cand}\n\n[Response 2]\n{base}" in t]
        second = [t for t in fake.seen if f"[Response 1]\n{base}\n\n[Response 2]\n{cand}" in t]
        assert len(first) == 1 and len(second) == 1


def test_pairwise_content_judge_wins_and_loses_in_both_orders(tokenizer):
    def prefers_paris(text):
        first = text.split("[Response 1]")[1].split("[Response 2]")[0]
        return {"1": 3.0, "2": 0.0} if "Paris" in first else {"1": 0.0, "2": 3.0}

    judge, _ = _judge(tokenizer, prefers_paris)
    verdicts = judge.pairwise(["q", "q"], ["Paris.", "Lyon."], ["Lyon.", "Paris."])
    assert [v.outcome for v in verdicts] == ["win", "lose"]


def test_combine_orders_rule():
    from models.judge import combine_orders, order_outcome, summarize_pairwise, PairVerdict

    assert combine_orders(1, 1) == "win" and combine_orders(1, 0) == "win"
    assert combine_orders(1, -1) == "tie" and combine_orders(0, 0) == "tie"
    assert combine_orders(-1, 0) == "lose" and combine_orders(-1, -1) == "lose"
    assert order_outcome(0.55, tie_margin=0.1) == 0 and order_outcome(0.7, tie_margin=0.1) == 1
    summary = summarize_pairwise([PairVerdict(.9, .9, "win"), PairVerdict(.9, .1, "tie"), PairVerdict(.1, .1, "lose"),
                                  PairVerdict(.9, .9, "win")])
    assert summary["win_rate"] == 0.5 and summary["tie_rate"] == 0.25 and summary["winning_score"] == 1.25


def test_single_answer_score_is_deitas_expected_score(tokenizer):
    uniform, _ = _judge(tokenizer, lambda text: {})
    assert uniform.quality(["q"], ["a"]) == pytest.approx([3.5])
    peaked, fake = _judge(tokenizer, lambda text: {"5": 50.0})
    assert peaked.quality(["What is 2+2?"], ["4"]) == pytest.approx([5.0])
    # Deita's quality prompt, exactly, with BOS as a plain encode adds it.
    from models.deita import quality_prompt

    assert fake.seen[0] == "<|bos|>" + quality_prompt("What is 2+2?", "4")


# ---------------------------------------------------------------------------------------------- sandbox
def test_sandbox_kills_a_looping_completion_and_its_children():
    from tasks.evaluate import check_completion, load_humaneval

    problem = load_humaneval(1)[0]
    looping = ("    import subprocess, pathlib\n"
               "    p = subprocess.Popen(['sleep', '60'])\n"
               "    pathlib.Path('/tmp/pomona-sandbox-child-%d').write_text(str(p.pid))\n"
               "    while True:\n        pass\n") % os.getpid()
    start = time.monotonic()
    result = check_completion(problem, looping, timeout_s=1)
    assert result.status == "timed out"
    assert time.monotonic() - start < 30
    child = int(open(f"/tmp/pomona-sandbox-child-{os.getpid()}").read())
    os.remove(f"/tmp/pomona-sandbox-child-{os.getpid()}")
    time.sleep(0.2)
    alive = os.path.exists(f"/proc/{child}") and "Z" not in open(f"/proc/{child}/stat").read().split()[2]
    assert not alive, "the program's child process survived the timeout"


def test_sandbox_caps_a_completions_memory():
    from tasks.evaluate import run_sandboxed

    # 400 MB is refused under a 256 MB address-space cap (a MemoryError, not a machine out of memory) and fine under 2 GB
    hog = "block = bytearray(400 * 1024 * 1024)\nprint(len(block))\n"
    capped = run_sandboxed(hog, timeout_s=20, memory_mb=256)
    assert capped.status == "failed" and "MemoryError" in capped.detail
    assert run_sandboxed(hog, timeout_s=20, memory_mb=2048).status == "passed"


def test_sandbox_output_flood_ends_without_filling_memory():
    import resource

    from tasks.evaluate import run_sandboxed

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.monotonic()
    result = run_sandboxed("while True:\n    print('x' * 4096)\n", timeout_s=5)
    assert result.status in ("failed", "timed out")
    assert time.monotonic() - start < 30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 64 * 1024, "its output was buffered"


def test_sandbox_stops_a_huge_file_write():
    from tasks.evaluate import run_sandboxed

    writer = "with open('big.bin', 'wb') as f:\n    f.write(b'x' * (200 << 20))\nprint('written')\n"
    result = run_sandboxed(writer, timeout_s=20, file_mb=16)
    assert result.status == "failed" and "File too large" in result.detail


@pytest.mark.parametrize("network", ["isolated", "allowed"])
def test_sandbox_kills_a_hanging_programs_grandchildren(tmp_path, network):
    from tasks.evaluate import run_sandboxed

    pid_file = tmp_path / "grandchild.pid"
    # the program's child (a shell) starts a sleeping grandchild and waits; the program itself then hangs
    program = ("import subprocess\n"
               f"subprocess.Popen(['sh', '-c', 'sleep 60 & echo $! > {pid_file}; wait'])\n"
               "while True:\n    pass\n")
    assert run_sandboxed(program, timeout_s=2, network=network).status == "timed out"
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    alive = os.path.exists(f"/proc/{grandchild}") and "Z" not in open(f"/proc/{grandchild}/stat").read().split()[2]
    assert not alive, "the program's grandchild survived the timeout"


@pytest.fixture
def fresh_network_probe():
    """The network-isolation probe is cached per process: forget it before and after a test that changes PATH."""
    from tasks.evaluate import _network_isolation_probe

    _network_isolation_probe.cache_clear()
    yield
    _network_isolation_probe.cache_clear()


def test_an_isolated_program_has_no_network_and_an_allowed_one_has(fresh_network_probe):
    import socket

    from tasks.evaluate import run_sandboxed

    # a port listening on this machine's loopback: connections complete in the kernel (backlog), no accept() needed
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
        isolated = run_sandboxed(program, timeout_s=20)  # isolated is the default
        assert isolated.status == "failed" and "Network is unreachable" in isolated.detail, isolated
        assert run_sandboxed(program, timeout_s=20, network="isolated") == isolated
        assert run_sandboxed(program, timeout_s=20, network="allowed").status == "passed"


def test_an_isolated_program_is_the_started_process_under_every_limit(tmp_path, monkeypatch, fresh_network_probe):
    import resource
    import subprocess
    import sys

    from tasks.evaluate import run_sandboxed

    started = []
    real_popen = subprocess.Popen

    def recording(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc.pid)
        return proc

    monkeypatch.setattr(subprocess, "Popen", recording)
    report = tmp_path / "report.json"
    limits = ["RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_CORE"]
    program = ("import json, os, resource, sys\n"
               f"json.dump({{'pid': os.getpid(), 'group': os.getpgrp(), 'session': os.getsid(0), "
               f"'net': os.readlink('/proc/self/ns/net'), 'exe': os.path.realpath(sys.executable), "
               f"'limits': [resource.getrlimit(getattr(resource, n)) for n in {limits!r}]}}, "
               f"open({str(report)!r}, 'w'))\n")
    assert run_sandboxed(program, timeout_s=10, memory_mb=512, file_mb=16).status == "passed"
    seen = json.loads(report.read_text())
    # unshare execs Python in place: the process the sandbox started and signals, leading its own group and session
    assert seen["pid"] == seen["group"] == seen["session"] == started[-1]
    assert seen["exe"] == os.path.realpath(sys.executable)
    assert seen["net"] != os.readlink("/proc/self/ns/net")
    assert seen["limits"] == [[512 << 20] * 2, [11, 11], [16 << 20] * 2, [0, 0]]
    assert resource.getrlimit(resource.RLIMIT_AS) != (512 << 20, 512 << 20)  # set in the child only


REFUSING_UNSHARE = "#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n"


@pytest.mark.parametrize("unshare", [None, REFUSING_UNSHARE], ids=["no-unshare", "namespaces-refused"])
def test_isolation_this_machine_cannot_give_is_a_config_error_naming_the_fix(tmp_path, monkeypatch, unshare,
                                                                            fresh_network_probe):
    from configs.errors import ConfigError
    from tasks.evaluate import humaneval_stage, run_sandboxed

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if unshare is not None:  # an unshare that refuses, as where user namespaces are disabled
        (bin_dir / "unshare").write_text(unshare)
        (bin_dir / "unshare").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(ConfigError, match="humaneval.network: allowed") as refused:
        run_sandboxed("print('hello')\n", timeout_s=10)
    assert ("no `unshare` program" if unshare is None else "Operation not permitted") in str(refused.value)
    # the stage fails before it loads a model (this one does not exist), and `allowed` runs without unshare
    missing = ModelConfig(name_or_path=str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError, match="humaneval.network: allowed"):
        humaneval_stage(missing, "digest-no-netns", HumanEvalConfig(limit=1), GenerationSettings())
    assert run_sandboxed("print('hello')\n", timeout_s=10, network="allowed").status == "passed"


@pytest.mark.skipif(os.geteuid() == 0, reason="RLIMIT_NPROC is not enforced for root, so the fork limit cannot show")
def test_sandbox_limits_how_many_processes_a_program_starts():
    from tasks.evaluate import SANDBOX_EXTRA_PROCESSES, run_sandboxed

    # a bounded fork bomb (safe even without the limit): each child sleeps, the parent keeps forking
    bomb = ("import os, time\n"
            f"for _ in range({SANDBOX_EXTRA_PROCESSES * 4}):\n"
            "    if os.fork() == 0:\n        time.sleep(30)\n        os._exit(0)\n")
    result = run_sandboxed(bomb, timeout_s=20)
    assert result.status == "failed" and "BlockingIOError" in result.detail


def test_pass_at_1_on_known_correct_and_wrong_completions():
    from tasks.evaluate import check_completion, load_humaneval, pass_at_k

    problems = load_humaneval(2)
    correct = ("    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n"
               "            if abs(a - b) < threshold:\n                return True\n    return False\n")
    wrong = "    return []\n"
    results = [check_completion(problems[0], correct, 10), check_completion(problems[1], wrong, 10)]
    assert [r.status for r in results] == ["passed", "failed"]
    assert "AssertionError" in results[1].detail
    assert pass_at_k([[r.status == "passed"] for r in results], 1) == pytest.approx(0.5)
    assert pass_at_k([[True, False, False, False]], 1) == pytest.approx(0.25)  # unbiased estimator with n=4


@pytest.mark.parametrize("early_exit", ["import sys; sys.exit(0)", "import os; os._exit(0)", "quit()",
                                        "raise SystemExit(0)"])
def test_a_completion_that_exits_0_before_the_tests_finish_fails(early_exit):
    from tasks.evaluate import check_completion, load_humaneval

    problem = load_humaneval(1)[0]
    correct = ("    for i, a in enumerate(numbers):\n        for b in numbers[i + 1:]:\n"
               "            if abs(a - b) < threshold:\n                return True\n    return False\n")
    assert check_completion(problem, correct, 10).status == "passed"
    result = check_completion(problem, f"    {early_exit}\n", 10)  # runs when check() first calls the function
    assert result.status == "failed" and "before the tests finished" in result.detail


# ------------------------------------------------------------------------------------- stages, tiny model
@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return ModelConfig(name_or_path=str(tiny_model_dir))


def test_generations_are_cut_at_the_first_stop_sequence():
    from tasks.evaluate import cut_at_stop

    assert cut_at_stop("    return a + b\ndef g():\n    pass", ["\ndef ", "\nclass "]) == "    return a + b"
    assert cut_at_stop("x = 1\nclass A: pass\ndef f(): pass", ["\ndef ", "\nclass "]) == "x = 1"
    assert cut_at_stop("no stop here", ["\ndef "]) == "no stop here"


def test_lm_eval_stage_runs_local_mc_and_generate_tasks(tiny):
    from tasks.evaluate import lm_eval_stage

    out = lm_eval_stage(tiny, "digest-a", LmEvalConfig(limit=4))
    assert set(out.metrics) >= {"pomona_mc/acc_none", "pomona_mc/acc_norm_none", "pomona_gen/exact_match_strip"}
    assert all("," not in k for k in out.metrics)
    assert 0.0 <= out.metrics["pomona_mc/acc_none"] <= 1.0
    saved = json.loads(out.file("lm_eval_results.json").read_text())
    assert saved["n-samples"]["pomona_mc"]["effective"] == 4
    # the stage's metrics are lm-eval's own numbers under sanitised names, not something derived
    for key, value in {"pomona_mc/acc_none": saved["results"]["pomona_mc"]["acc,none"],
                       "pomona_gen/exact_match_strip": saved["results"]["pomona_gen"]["exact_match,strip"]}.items():
        assert out.metrics[key] == pytest.approx(value)
    # The copied task file points at the data by absolute path.
    assert str(out.file("lm_eval_tasks")) and "/configs/eval_tasks/data/pomona_mc.jsonl" in \
        out.file("lm_eval_tasks/pomona_mc.yaml").read_text()


def test_lm_eval_data_files_outside_the_task_folder_move_both_keys(tiny, tmp_path, monkeypatch):
    """A task YAML may name its data anywhere (`../shared/...`): the task folder's own digest does not see it, so an
    edited data file must move the stage's key and Prefect's cache key, or the old scores come back for new data."""
    import tasks.evaluate
    from configs.errors import ConfigError
    from tasks.evaluate import lm_eval_stage, task_data_fingerprints
    from tasks.store import file_digest, stage_cache_key

    task_dir, outside = tmp_path / "tasks", tmp_path / "elsewhere" / "mc.jsonl"
    (task_dir / "data").mkdir(parents=True)
    outside.parent.mkdir()
    outside.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    (task_dir / "data" / "gen.jsonl").write_text("{}\n")
    (task_dir / "mc.yaml").write_text("task: mc_outside\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                      "    test: ../elsewhere/mc.jsonl\n    validation: [data/gen.jsonl]\n")
    assert task_data_fingerprints(task_dir) == {str(outside.resolve()): file_digest(outside)}  # inside: own digest

    calls = []
    monkeypatch.setattr(tasks.evaluate, "run_lm_eval", lambda *a: calls.append(1) or {"results": {}})
    cfg = LmEvalConfig(task_dir=str(task_dir), tasks=["mc_outside"])
    first, cache_key = lm_eval_stage(tiny, "digest-a", cfg), stage_cache_key(None, {"cfg": cfg})
    assert lm_eval_stage(tiny, "digest-a", cfg).reused and len(calls) == 1
    outside.write_text('{"question": "q2", "choices": ["a", "b"], "answer": 1}\n')
    again = lm_eval_stage(tiny, "digest-a", cfg)
    assert len(calls) == 2 and again.key != first.key and stage_cache_key(None, {"cfg": cfg}) != cache_key

    # a data file that is not there stops the stage with the YAML and the name, before lm-eval's traceback
    outside.unlink()
    with pytest.raises(ConfigError, match=r"mc\.yaml: data file '\.\./elsewhere/mc\.jsonl' does not exist"):
        lm_eval_stage(tiny, "digest-a", cfg)
    assert stage_cache_key(None, {"cfg": cfg})  # the cache key leaves it to the stage


def test_lm_eval_log_likelihoods_of_a_bfloat16_model_are_summed_in_float32(tiny):
    """On CUDA the model is bfloat16 ('auto'): lm-eval's default log-softmax and sum in the model's dtype rounded a
    continuation's log-likelihood of -158.8 to -159.0 (bfloat16's step there is 1), tying multiple-choice options.
    The same bfloat16 model on CPU shows it; the yardstick is float64 over the model's own bfloat16 logits."""
    import torch
    from lm_eval.api.instance import Instance

    from models.loading import load_model
    from tasks.evaluate import harness_model

    model, tokenizer = load_model(tiny.model_copy(update={"dtype": "bfloat16", "device": "cpu"}))
    lm = harness_model(model, tokenizer, batch_size=2)
    context = "Question: what is the capital of France?\nAnswer:"
    continuation = " The capital of France is Paris, a large city on the river Seine."
    [(got, _)] = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    whole, start = lm.tok_encode(context + continuation), len(lm.tok_encode(context))
    with torch.no_grad():
        logp = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
    expected = math.fsum(float(logp[i - 1, whole[i]]) for i in range(start, len(whole)))
    assert expected < -2 ** 7  # where bfloat16 holds whole numbers only, so its rounding would show
    assert got == pytest.approx(expected, abs=1e-3)


def test_instruction_answers_judged_against_file_baseline(tiny, monkeypatch):
    from tasks.evaluate import answers_stage, judge_stage

    inst = InstructionEvalConfig(
        sets=["vicuna", "sinstruct"], data_dir=str(SHARED / "eval"), limit=2,
        baseline_answers={"vicuna": BaselineAnswersFile(path=str(SHARED / "candidates/vicuna_two_models.json")),
                          "sinstruct": BaselineAnswersFile(path=str(SHARED / "candidates/sinstruct_two_models.json"))})
    gen = GenerationSettings(max_new_tokens=6, batch_size=4)
    answers = answers_stage(tiny, "digest-a", inst, gen)
    rows = [json.loads(line) for line in answers.file("answers.jsonl").read_text().splitlines()]
    assert [(r["set"], r["index"]) for r in rows] == [("vicuna", 0), ("vicuna", 1), ("sinstruct", 0), ("sinstruct", 1)]
    assert rows[0]["prompt"] == "How can I improve my time management skills?"
    assert rows[2]["prompt"].endswith("please let me know.")  # Self-Instruct: instruction + the instance input

    judged = judge_stage(answers, None, inst, JudgeConfig(model=tiny, max_answer_tokens=64))
    out = [json.loads(line) for line in judged.file("judgments.jsonl").read_text().splitlines()]
    assert len(out) == 4 and {r["outcome"] for r in out} <= {"win", "tie", "lose"}
    assert out[0]["baseline_answer"].startswith(json.load(open(SHARED / "candidates/vicuna_two_models.json"))
                                                ["data"][0]["Answer2"][:40])
    assert all(1.0 <= r["quality"] <= 6.0 for r in out)
    m = judged.metrics
    assert m["all/win_rate"] + m["all/tie_rate"] + m["all/lose_rate"] == pytest.approx(1.0)
    assert m["all/pairs"] == 4 and "vicuna/quality" in m

    # killed after its shards were written: the rerun rebuilds the same judgments without loading the judge
    import models.judge

    text = judged.file("judgments.jsonl").read_text()
    for name in ("_SUCCESS", "judgments.jsonl"):
        (Path(judged.path) / name).unlink()
    monkeypatch.setattr(models.judge.LogitJudge, "__init__", lambda *a, **k: pytest.fail("the judge was reloaded"))
    again = judge_stage(answers, None, inst, JudgeConfig(model=tiny, max_answer_tokens=64))
    assert again.file("judgments.jsonl").read_text() == text and again.metrics == m


def test_answers_stage_resumes_at_its_first_unfinished_shard(tiny, monkeypatch):
    """A killed answer generation keeps its finished shards; the resumed answers equal an uninterrupted run's."""
    import shutil

    import tasks.evaluate
    from tasks.evaluate import answers_stage

    inst = InstructionEvalConfig(sets=["koala"], data_dir=str(SHARED / "eval"), limit=5, pairwise=False)
    # sampled, so the comparison also shows each shard regenerates its own random stream
    gen = GenerationSettings(max_new_tokens=6, batch_size=1, do_sample=True, seed=3)
    monkeypatch.setattr(tasks.evaluate, "SHARD_BATCHES", 2)  # shards of 2 prompts: 3 shards
    real, calls, killed = tasks.evaluate.generate_texts, [], []

    def dies_in_second_shard(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 2 and not killed:
            killed.append(True)
            raise KeyboardInterrupt("killed")
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(tasks.evaluate, "generate_texts", dies_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        answers_stage(tiny, "digest-resume", inst, gen)
    calls.clear()
    resumed = answers_stage(tiny, "digest-resume", inst, gen)
    assert calls == [2, 1]  # shard 0 was kept from the killed run
    answers = resumed.file("answers.jsonl").read_text()
    shutil.rmtree(resumed.path)
    calls.clear()
    assert answers_stage(tiny, "digest-resume", inst, gen).file("answers.jsonl").read_text() == answers
    assert calls == [2, 2, 1] and len(answers.splitlines()) == 5
    assert sum(bool(json.loads(line)["answer"]) for line in answers.splitlines()) >= 3  # real text compared


def test_instruction_answers_judged_against_a_baseline_models_answers(tiny, tmp_path):
    """The baseline model answers the same prompts (its own cached stage), and the judge sees those answers."""
    from models.tiny import build_tiny_model
    from tasks.evaluate import answers_stage, evaluate_model, judge_stage, model_fingerprint

    base = ModelConfig(name_or_path=str(build_tiny_model(tmp_path / "baseline", seed=7)))
    inst = InstructionEvalConfig(sets=["vicuna"], data_dir=str(SHARED / "eval"), limit=2, baseline_model=base)
    gen = GenerationSettings(max_new_tokens=8, batch_size=4, do_sample=True)  # greedy random models stop at once
    cfg = EvaluateConfig(lm_eval=None, instruction=inst, generation=gen,
                         judge=JudgeConfig(model=tiny, max_answer_tokens=64))
    table = evaluate_model(tiny, "digest-a", cfg, label="candidate")
    baseline = answers_stage(base, model_fingerprint(base), inst, gen)
    assert baseline.reused  # the evaluation ran it already: the same stage, found in the store
    theirs = [json.loads(line)["answer"] for line in baseline.file("answers.jsonl").read_text().splitlines()]
    answers = answers_stage(tiny, "digest-a", inst, gen)
    ours = [json.loads(line)["answer"] for line in answers.file("answers.jsonl").read_text().splitlines()]
    assert theirs != ours  # two different models: the judge compares two different answer sets
    judge_out = judge_stage(answers, baseline, inst, cfg.judge)
    assert judge_out.reused
    judged = [json.loads(line) for line in judge_out.file("judgments.jsonl").read_text().splitlines()]
    assert [r["baseline_answer"] for r in judged] == theirs and [r["answer"] for r in judged] == ours
    assert table.metrics["judge/all/pairs"] == 2


def test_an_empty_or_broken_instruction_test_set_names_its_file(tmp_path):
    # an empty set used to pass here and divide by zero in the judge stage's mean scores
    from configs.errors import RecordError
    from tasks.evaluate import load_instruction_set

    path = tmp_path / "vicuna_test_set.jsonl"
    path.write_text("\n")
    with pytest.raises(RecordError) as err:
        load_instruction_set("vicuna", str(tmp_path))
    assert str(err.value) == (f"{path}, whole file: no test prompts in it: add prompts, or remove 'vicuna' from "
                              "evaluate.instruction.sets")
    path.write_text('{"text": "Hi?"}\n\n{"text": "caf\xe9"\n')
    with pytest.raises(RecordError, match=r"vicuna_test_set.jsonl, line 3: invalid JSON"):
        load_instruction_set("vicuna", str(tmp_path))
    path.write_text('{"text": "Hi?"}\n\n["Hello?"]\n')
    with pytest.raises(RecordError, match=r"line 3: wrong type: expected a JSON object, got list"):
        load_instruction_set("vicuna", str(tmp_path))
    path.write_text('{"text": "Hi?"}\n\n{"text": "Bye?"}\n')
    assert [r["prompt"] for r in load_instruction_set("vicuna", str(tmp_path), limit=1)] == ["Hi?"]


def test_pairwise_needs_a_baseline():
    with pytest.raises(ValueError, match="needs a baseline"):
        InstructionEvalConfig(sets=["vicuna"])
    with pytest.raises(ValueError, match="judge"):
        EvaluateConfig(lm_eval=None, instruction=InstructionEvalConfig(sets=["vicuna"], pairwise=False))


def test_humaneval_stage_generates_executes_and_scores(tiny):
    from tasks.evaluate import humaneval_stage

    out = humaneval_stage(tiny, "digest-a", HumanEvalConfig(limit=2, timeout_s=5, max_new_tokens=8),
                          GenerationSettings(batch_size=2))
    rows = [json.loads(line) for line in out.file("humaneval_results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert {r["status"] for r in rows} <= {"passed", "failed", "timed out"}
    assert out.metrics["pass@1"] == sum(r["status"] == "passed" for r in rows) / 2
    assert out.params == {"humaneval.network": "isolated"} and "no network" in out.summary


def test_humaneval_decodes_greedily_even_when_the_config_samples(tiny, monkeypatch):
    import tasks.evaluate
    from tasks.evaluate import humaneval_stage

    used = []

    def recording(model, tokenizer, prompts, settings, **kw):
        used.append(settings)
        return real(model, tokenizer, prompts, settings, **kw)

    real = tasks.evaluate.generate_texts
    monkeypatch.setattr(tasks.evaluate, "generate_texts", recording)
    sampling = GenerationSettings(batch_size=2, do_sample=True, temperature=0.7, top_p=0.9, seed=3)
    humaneval_stage(tiny, "digest-greedy", HumanEvalConfig(limit=2, timeout_s=5, max_new_tokens=8), sampling)
    assert used and not any(settings.do_sample for settings in used)


def test_generation_kwargs_carry_sampling_parameters_only_when_sampling():
    from tasks.evaluate import generation_kwargs, humaneval_generation

    sampling = GenerationSettings(do_sample=True, temperature=0.7, top_p=0.9)
    assert generation_kwargs(sampling, 0) == {"max_new_tokens": 256, "do_sample": True, "pad_token_id": 0,
                                              "temperature": 0.7, "top_p": 0.9}
    assert generation_kwargs(humaneval_generation(sampling), 0, 16) == {"max_new_tokens": 16, "do_sample": False,
                                                                        "pad_token_id": 0}


def test_greedy_answers_are_keyed_without_the_sampling_fields_they_do_not_read(tmp_path, monkeypatch):
    import tasks.evaluate
    from configs.evaluate import InstructionEvalConfig
    from configs.schema import ModelConfig
    from tasks.evaluate import answers_stage
    from tasks.store import stage_key

    (tmp_path / "vicuna_test_set.jsonl").write_text('{"text": "q"}\n')
    keys = []
    monkeypatch.setattr(tasks.evaluate, "run_stage", lambda stage, config, inputs, body, **kw: keys.append(
        stage_key(stage, config, inputs)))
    inst, model = InstructionEvalConfig(data_dir=str(tmp_path), pairwise=False), ModelConfig(name_or_path="tiny:0")
    for settings in (GenerationSettings(), GenerationSettings(temperature=0.3, top_p=0.5, seed=7),
                     GenerationSettings(do_sample=True, seed=1), GenerationSettings(do_sample=True, seed=2)):
        answers_stage(model, "digest", inst, settings)
    assert keys[0] == keys[1]  # greedy: the same answers, reused
    assert len({keys[0], keys[2], keys[3]}) == 3  # sampling: each seed its own answers


def test_killed_humaneval_resumes_at_its_unfinished_shard_with_identical_results(tiny, tmp_path, monkeypatch):
    import tasks.evaluate
    from tasks.evaluate import humaneval_stage

    cfg, gen = HumanEvalConfig(limit=10, timeout_s=5, max_new_tokens=8), GenerationSettings(batch_size=1)
    real_check, checked = tasks.evaluate.check_completion, []

    def killed_in_the_second_shard(problem, *args):
        if len(checked) == 9:  # shards of 8 problems (8 batches of 1): the first is written, the second is not
            raise KeyboardInterrupt("killed")
        checked.append(problem["task_id"])
        return real_check(problem, *args)

    monkeypatch.setattr(tasks.evaluate, "check_completion", killed_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        humaneval_stage(tiny, "digest-resume", cfg, gen)
    checked.clear()
    resumed = humaneval_stage(tiny, "digest-resume", cfg, gen)
    assert checked == ["HumanEval/8", "HumanEval/9"]  # only the unfinished shard ran again
    monkeypatch.setattr(tasks.evaluate, "check_completion", real_check)
    monkeypatch.setenv("POMONA_HOME", str(tmp_path / "fresh"))
    fresh = humaneval_stage(tiny, "digest-resume", cfg, gen)
    assert fresh.path != resumed.path
    assert resumed.file("humaneval_results.jsonl").read_text() == fresh.file("humaneval_results.jsonl").read_text()
    assert resumed.metrics == fresh.metrics and resumed.metrics["problems"] == 10


def test_heldout_likelihood_stage_is_deterministic_and_rejects_long_prompts(tiny):
    from tasks.evaluate import likelihood_stage

    cfg = HeldoutLikelihoodConfig(data=DataConfig(path=str(DATA / "alpaca_demo_200.json"), limit=8), max_length=96)
    out = likelihood_stage(tiny, "digest-a", cfg)
    rows = [json.loads(line) for line in out.file("heldout_scores.jsonl").read_text().splitlines()]
    tokens = sum(r["n_tokens"] for r in rows)
    assert out.metrics["mean_nll"] == pytest.approx(sum(r["nll_sum"] for r in rows) / tokens)
    assert 4.0 < out.metrics["mean_nll"] < 9.0  # a random model over a ~600-token vocabulary: about ln(600)
    # one record by hand: HF's loss on the reply's tokens only (prompt positions labelled -100), as a user would
    import torch

    from models.loading import load_model
    from tasks.data import read_records

    model, tok = load_model(tiny)
    record = next(r for r in read_records(cfg.data.path).records if r.id == rows[0]["id"])
    prompt = tok.apply_chat_template(record.messages[:-1], tokenize=False, add_generation_prompt=True)
    ids = tok.encode(tok.apply_chat_template(record.messages, tokenize=False), add_special_tokens=False)[:96]
    labels = torch.tensor([ids])
    labels[0, :len(tok.encode(prompt, add_special_tokens=False))] = -100
    with torch.no_grad():
        loss = float(model(torch.tensor([ids]), labels=labels).loss)
    assert rows[0]["nll_sum"] / rows[0]["n_tokens"] == pytest.approx(loss, abs=1e-4)
    assert out.metrics["records_scored"] + out.metrics["records_skipped"] == 8
    # at max_length 96 long replies are cut: each such row is flagged, and they are counted
    assert out.metrics["records_truncated"] == sum(r["truncated"] for r in rows) > 0
    assert all(r["n_tokens"] < 96 for r in rows)
    rejects = [json.loads(line) for line in out.file("rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == out.metrics["records_skipped"] and all("max_length" in r["reason"] for r in rejects)
    again = likelihood_stage(tiny, "digest-b", cfg)  # another model digest: recomputed, same weights, same numbers
    assert again.path != out.path and again.metrics["mean_nll"] == pytest.approx(out.metrics["mean_nll"], abs=1e-6)


def test_heldout_nll_is_the_grape_engines_response_nll_of_the_same_conversation(tiny, tmp_path):
    import copy

    from models.fit import CandidateGroup, candidate_tokens, fit_plain
    from models.likelihood import score_requests
    from models.loading import load_model
    from tasks.data import read_records
    from tasks.evaluate import heldout_requests

    model, tok = load_model(tiny)
    tok = copy.deepcopy(tok)  # a ChatML-like template: a newline after each turn's end marker
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    rows = json.loads((DATA / "alpaca_demo_200.json").read_text())[:3]
    rows.append({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."},
                                   {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]})
    (tmp_path / "alpaca.json").write_text(json.dumps(rows[:3]))
    (tmp_path / "sharegpt.json").write_text(json.dumps(rows[3:]))
    records = read_records(tmp_path / "alpaca.json").records + read_records(tmp_path / "sharegpt.json").records
    requests, rejects, truncated = heldout_requests(records, tok, max_length=4096)
    assert not rejects and not truncated and len(requests) == 4
    for record, (rid, request) in zip(records, requests):
        # the scored tokens are the reply and its end marker, not the template's newline after it
        assert tok.decode(request.input_ids[request.target_start:]) == record.messages[-1]["content"] + "<|end|>"
        (tokens,) = candidate_tokens(tok, record.messages[:-1], [record.messages[-1]["content"]], record.id)
        (engine,) = fit_plain(model, [CandidateGroup(tokens.prompt_ids, (tokens.target_ids(True),))])[0:1]
        (heldout,) = score_requests(model, [request])
        assert rid == record.id and heldout.n_tokens == engine[0].n_tokens
        assert heldout.nll_sum == pytest.approx(engine[0].nll_sum, abs=1e-4)


def test_evaluate_flow_logs_table(prefect_server, tiny):
    from flows.evaluate import evaluate
    from tasks.track import client

    cfg = EvaluateFlowConfig(name="eval-flow-test", model=tiny, evaluate=EvaluateConfig(
        lm_eval=None, likelihood=HeldoutLikelihoodConfig(data=DataConfig(path=str(DATA / "alpaca_demo_200.json"), limit=4))),
        tracking=TrackingConfig())
    failed = evaluate(cfg, fail_at="eval-table", return_state=True)  # the last stage fails: the rerun redoes it alone
    assert failed.is_failed()
    states = task_states(failed.state_details.flow_run_id)
    assert states["eval-likelihood"] == "Completed" and states["eval-table"] == "Failed"
    rerun = evaluate(cfg, return_state=True)
    states = task_states(rerun.state_details.flow_run_id)
    assert states["eval-likelihood"] == "Cached" and states["eval-table"] == "Completed"
    table = rerun.result()
    assert "likelihood/mean_nll" in table.metrics and math.isfinite(table.metrics["likelihood/mean_nll"])
    runs = client().search_runs([client().get_experiment_by_name("eval-flow-test").experiment_id])
    assert {r.info.run_name for r in runs} >= {"eval-flow-test", "eval-likelihood", "eval-table"}


def test_pass_at_k_is_the_mean_of_per_problem_estimates_not_a_pooled_rate():
    from tasks.evaluate import pass_at_k

    # problem 1: 1 of 1 passes (1.0); problem 2: 0 of 3 (0.0) -> mean 0.5, where pooling would give 1 / 4
    assert pass_at_k([[True], [False, False, False]], 1) == pytest.approx(0.5)
    # unbiased pass@k = 1 - C(n - c, k) / C(n, k): n=5, c=2, k=2 -> 1 - 3/10 = 0.7; with n=2, c=0: 0 -> mean 0.35
    assert pass_at_k([[True, True, False, False, False], [False, False]], 2) == pytest.approx(0.35)


def test_an_exact_even_verdict_is_a_tie_in_each_order(tokenizer):
    from models.judge import order_outcome

    assert order_outcome(0.5) == 0 and order_outcome(0.6, tie_margin=0.1) == 0
    assert order_outcome(0.4, tie_margin=0.1) == 0 and order_outcome(0.39, tie_margin=0.1) == -1
    judge, _ = _judge(tokenizer, lambda text: {})  # equal logits for "1" and "2": P = 0.5 in both orders
    verdicts = judge.pairwise(["q"], ["a"], ["b"])
    assert verdicts[0].p_candidate_first == verdicts[0].p_candidate_second == 0.5
    assert verdicts[0].outcome == "tie"


def test_heldout_likelihood_leaves_out_a_conversation_holding_a_special_tokens_text(tiny, tmp_path):
    """Two ShareGPT V3 replies end in the text '<|endoftext|>': the model's tokenizer would score that control
    token, not the text. Here the tiny tokenizer's '<|end|>' stands in for it: such a conversation is a reject
    naming the message and token, counted; the others score as they do without it; the template's own
    '<|user|>' and '<|end|>' are no reject. All of them held: the stage refuses."""
    from configs.errors import ConfigError
    from tasks.data import read_jsonl
    from tasks.evaluate import likelihood_stage

    convs = [{"conversations": [{"from": "human", "value": f"Name a colour, {n}."},
                                {"from": "gpt", "value": f"Blue, {n}."},
                                {"from": "human", "value": "And another?"}, {"from": "gpt", "value": "Green."}]}
             for n in ("please", "now", "quickly", "friend")]
    (tmp_path / "clean.json").write_text(json.dumps(convs))
    convs[1]["conversations"][1]["value"] += " Skipped 1 messages<|end|>"
    (tmp_path / "held.json").write_text(json.dumps(convs))
    out = {name: likelihood_stage(tiny, "digest", HeldoutLikelihoodConfig(
        data=DataConfig(path=str(tmp_path / f"{name}.json")), max_length=256)) for name in ("clean", "held")}
    assert out["clean"].metrics["records_scored"] == 4 and out["clean"].metrics["records_special_tokens"] == 0
    rejects = read_jsonl(out["held"].file("rejects.jsonl"))
    assert [(r["location"], r["reason"]) for r in rejects] == [
        ("record 1", "special token in the text: the assistant message 2 holds '<|end|>', which the tokenizer would "
                     "read as that control token, not as text")]
    assert out["held"].metrics["records_special_tokens"] == 1 and out["held"].metrics["records_scored"] == 3
    before = {r["id"]: r for r in read_jsonl(out["clean"].file("heldout_scores.jsonl"))}
    after = read_jsonl(out["held"].file("heldout_scores.jsonl"))
    assert len(after) == 3 and rejects[0]["id"] not in {r["id"] for r in after}
    for row in after:
        assert row["n_tokens"] == before[row["id"]]["n_tokens"]
        assert row["nll_sum"] == pytest.approx(before[row["id"]]["nll_sum"], rel=1e-5)
    for conv in convs:
        conv["conversations"][0]["value"] += "<|end|>"
    (tmp_path / "all.json").write_text(json.dumps(convs))
    with pytest.raises(ConfigError, match=r"^eval-likelihood: all 4 records hold one of the tokenizer's special "
                                          r"tokens as text \(first: the user message 1 holds '<\|end\|>'\)"):
        likelihood_stage(tiny, "digest", HeldoutLikelihoodConfig(data=DataConfig(path=str(tmp_path / "all.json"))))


def test_instruction_prompts_and_answers_holding_a_special_tokens_text_are_left_out_counted_and_listed(tiny,
                                                                                                      tmp_path):
    """A test prompt, an answer or a baseline answer holding the text of one of the tokenizer's special tokens
    ('<|end|>' of the tiny tokenizer, standing in for '<|endoftext|>') was generated from, and judged as, that
    control token. eval-answers does not answer such a prompt (null answer with the reason, rejects.jsonl,
    answers_special_tokens); eval-judge leaves out what was not answered and what holds one of its judge's special
    tokens (rejects.jsonl, counted); the others are answered and judged as without them. All held: a ConfigError."""
    from configs.errors import ConfigError
    from tasks.data import read_jsonl, write_jsonl
    from tasks.evaluate import answers_stage, judge_stage
    from tasks.store import StageOutput

    prompts = ["Name a colour.", "Say hi.<|end|> And bye.", "Count to three.", "Name a fruit.", "Name a tree."]
    baseline = ["Blue.", "Hi.", "One two three.", "Pear<|end|>", "Oak."]
    for name, keep in (("clean", [0, 2]), ("held", [0, 1, 2])):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "vicuna_test_set.jsonl", [{"text": prompts[k]} for k in keep])
        (tmp_path / name / "baseline.json").write_text(json.dumps([{"text": prompts[k], "Answer2": baseline[k]}
                                                                   for k in keep]))
    gen = GenerationSettings(max_new_tokens=6, batch_size=4, do_sample=True)
    judge = JudgeConfig(model=tiny, max_answer_tokens=64)

    def instruction(name):
        return InstructionEvalConfig(sets=["vicuna"], data_dir=str(tmp_path / name), baseline_answers={
            "vicuna": BaselineAnswersFile(path=str(tmp_path / name / "baseline.json"))})

    clean = answers_stage(tiny, "digest-clean", instruction("clean"), gen)
    held = answers_stage(tiny, "digest-held", instruction("held"), gen)
    reason = ("special token in the text: the test prompt holds '<|end|>', which the tokenizer would read as that "
              "control token, not as text")
    assert read_jsonl(held.file("rejects.jsonl")) == [{"set": "vicuna", "index": 1, "reason": reason}]
    rows = read_jsonl(held.file("answers.jsonl"))
    assert rows[1] == {"set": "vicuna", "index": 1, "prompt": prompts[1], "answer": None, "reason": reason}
    assert [rows[0]["answer"], rows[2]["answer"]] == [r["answer"] for r in read_jsonl(clean.file("answers.jsonl"))]
    assert held.metrics["answers_special_tokens"] == 1 and held.metrics["answers"] == 2
    assert clean.metrics["answers_special_tokens"] == 0

    judged_clean = judge_stage(clean, None, instruction("clean"), judge)
    judged_held = judge_stage(held, None, instruction("held"), judge)
    assert read_jsonl(judged_held.file("rejects.jsonl")) == [
        {"set": "vicuna", "index": 1, "reason": "not answered (eval-answers): " + reason}]
    without_index = lambda out: [{k: v for k, v in r.items() if k != "index"}  # noqa: E731
                                 for r in read_jsonl(out.file("judgments.jsonl"))]
    assert without_index(judged_held) == without_index(judged_clean)
    assert [r["index"] for r in read_jsonl(judged_held.file("judgments.jsonl"))] == [0, 2]
    assert judged_held.metrics["not_judged"] == 1 and judged_held.metrics["all/pairs"] == 2
    assert judged_held.metrics["rejected[not answered (eval-answers)]"] == 1
    assert judged_held.metrics["all/quality"] == judged_clean.metrics["all/quality"]

    # the judge's own tokenizer: an answer, or a baseline answer, holding one of its special tokens is not judged
    (tmp_path / "all").mkdir()
    write_jsonl(tmp_path / "all" / "vicuna_test_set.jsonl", [{"text": p} for p in prompts[:4]])
    (tmp_path / "all" / "baseline.json").write_text(json.dumps([{"text": p, "Answer2": b}
                                                                for p, b in zip(prompts[:4], baseline)]))
    given = [{"set": "vicuna", "index": 0, "prompt": prompts[0], "answer": "Red."},
             {"set": "vicuna", "index": 1, "prompt": prompts[1], "answer": None, "reason": reason},
             {"set": "vicuna", "index": 2, "prompt": prompts[2], "answer": "1 2 3 <|end|>"},
             {"set": "vicuna", "index": 3, "prompt": prompts[3], "answer": "Apple."}]

    def fake_answers(name, rows):
        write_jsonl(tmp_path / name / "answers.jsonl", rows)
        return StageOutput(stage="eval-answers", key=name, path=str(tmp_path / name), digest=name)

    out = judge_stage(fake_answers("fake-answers", given), None, instruction("all"), judge)
    token = "'<|end|>', which the tokenizer would read as that control token, not as text"
    assert [r["reason"] for r in read_jsonl(out.file("rejects.jsonl"))] == [
        "not answered (eval-answers): " + reason, "special token in the text: the answer holds " + token,
        "special token in the text: the baseline answer holds " + token]
    assert [r["index"] for r in read_jsonl(out.file("judgments.jsonl"))] == [0]
    assert out.metrics["judge_special_tokens"] == 2 and out.metrics["not_judged"] == 3 and out.metrics["all/pairs"] == 1
    with pytest.raises(ConfigError, match=r"^eval-judge: all 2 answers hold one of the tokenizer's special tokens as "
                                          r"text \(first: the answer holds '<\|end\|>'\)"):
        judge_stage(fake_answers("all-held", given[2:]), None, instruction("all"), judge)
    with pytest.raises(ConfigError, match=r"^eval-judge: none of the 2 answers can be judged \(not answered "
                                          r"\(eval-answers\) 1, special token in the text 1; each is listed in "):
        judge_stage(fake_answers("none-left", given[1:3]), None, instruction("all"), judge)
    # a test prompt every one of which holds the model's special token: the answers stage refuses
    (tmp_path / "prompts-held").mkdir()
    write_jsonl(tmp_path / "prompts-held" / "vicuna_test_set.jsonl", [{"text": prompts[1]}])
    with pytest.raises(ConfigError, match=r"^eval-answers: all 1 test prompts hold one of the tokenizer's special"):
        answers_stage(tiny, "digest-held", InstructionEvalConfig(
            sets=["vicuna"], data_dir=str(tmp_path / "prompts-held"), pairwise=False), gen)


@pytest.mark.parametrize("instances, field, reason", [
    ({"input": "he go home"}, "instances", "expected a list with exactly one"),
    ("he go home", "instances", "expected a list with exactly one"),
    ([{"input": 5}], "instances[0].input", "wrong type: expected a string, got int"),
])
def test_a_self_instruct_test_prompt_with_bad_instances_names_the_field(tmp_path, instances, field, reason):
    # a dict used to end in KeyError 0, a number in AttributeError, and a string was dropped without a word
    from configs.errors import RecordError
    from tasks.evaluate import load_instruction_set

    path = tmp_path / "sinstruct_test_set.jsonl"
    path.write_text(json.dumps({"instruction": "Fix the grammar."}) + "\n" +
                    json.dumps({"instruction": "Fix the grammar.", "instances": instances}) + "\n")
    with pytest.raises(RecordError) as err:
        load_instruction_set("sinstruct", str(tmp_path))
    assert (err.value.location, err.value.field) == ("line 2", field) and reason in err.value.reason
    path.write_text(json.dumps({"instruction": "Fix the grammar.", "instances": [{"input": "he go home"}]}) + "\n")
    assert load_instruction_set("sinstruct", str(tmp_path))[0]["prompt"] == "Fix the grammar.\n\nhe go home"


@pytest.mark.parametrize("content, location, reason", [
    (None, "file", "no such file"),
    ('[{"Instruction": "Hi?", "Answer2": "Hello."}', "line 1", "invalid JSON"),
    ('{"data": {"Instruction": "Hi?", "Answer2": "Hello."}}', "top level", "wrong type: expected a JSON array"),
    ('{"Instruction": "Hi?", "Answer2": "Hello."}', "top level", "wrong type: expected a JSON array"),
])
def test_a_broken_baseline_answers_file_names_the_file_and_where(tmp_path, content, location, reason):
    # these used to end in FileNotFoundError, JSONDecodeError and KeyError 0 tracebacks
    from configs.errors import RecordError
    from tasks.evaluate import load_baseline_file

    path = tmp_path / "baseline.json"
    if content is not None:
        path.write_text(content)
    prompts = [{"set": "wizardlm", "index": 0, "prompt": "Hi?"}]
    with pytest.raises(RecordError) as err:
        load_baseline_file("wizardlm", str(path), "Answer2", prompts)
    assert err.value.file == str(path) and err.value.location == location and reason in err.value.reason
    jsonl = tmp_path / "baseline.jsonl"
    jsonl.write_text('{"Instruction": "Hi?", "Answer2": "Hello."}\n\n{"Instruction": "Bye?"\n')
    with pytest.raises(RecordError, match=r"baseline.jsonl, line 3: invalid JSON"):
        load_baseline_file("wizardlm", str(jsonl), "Answer2", prompts)
    jsonl.write_text('{"Instruction": "Hi?", "Answer2": "Hello."}\n\n{"Instruction": "Bye?", "Answer2": "Bye."}\n')
    both = prompts + [{"set": "wizardlm", "index": 1, "prompt": "Bye?"}]
    assert load_baseline_file("wizardlm", str(jsonl), "Answer2", both) == ["Hello.", "Bye."]
