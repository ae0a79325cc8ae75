"""Generation backends and the resumable `generate` stage: tiny transformers models, and a fake OpenAI server."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from configs.errors import ConfigError
from configs.grape import EndpointConfig, GeneratorConfig, SamplingConfig
from configs.schema import DataConfig, ModelConfig
from models.generation import GenerationError, OpenAIChatGenerator, TransformersGenerator, make_generator
from tasks.data import prepare_records
from tasks.generate import generate_candidates, read_parquet
from tests.conftest import DATA

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


CONVERSATIONS = [[{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "user", "content": "Write a short poem about the sea and the silver moon."}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]


# ------------------------------------------------------------------------------------------ a fake server
class FakeChatServer:
    """A local OpenAI-compatible /v1/chat/completions with scripted failures, delays and a request log."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.script: list[tuple[int, dict]] = []  # (status, headers) answered before normal replies
        self.fail_after: int | None = None  # answer `fail_status` once this many requests succeeded
        self.fail_status = 400
        # a conversation whose last turn holds this text is refused: (status, the server's own wording)
        self.refuse_containing: str | None = None
        self.refusal = (400, {"object": "error", "message": "This model's maximum context length is 2048 tokens. "
                                                            "However, you requested 4100 tokens.", "code": 400})
        self.delay_s = 0.0
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    scripted = server.script.pop(0) if server.script else None
                    ok = sum(1 for r in server.requests if r.get("_ok"))
                    refuse = server.fail_after is not None and ok >= server.fail_after
                    if scripted is None and not refuse:
                        body["_ok"] = True
                try:
                    time.sleep(server.delay_s)
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": "not found"})
                    if scripted is not None:
                        return self._send(scripted[0], {"error": "scripted"}, scripted[1])
                    if refuse:
                        return self._send(server.fail_status, {"error": "bad request"})
                    if server.refuse_containing and server.refuse_containing in body["messages"][-1]["content"]:
                        return self._send(*server.refusal)
                    text = f"echo {body['messages'][-1]['content'][:20]} seed={body['seed']}"
                    self._send(200, {"choices": [{"message": {"role": "assistant", "content": text},
                                                  "finish_reason": "stop"}],
                                     "usage": {"prompt_tokens": 11, "completion_tokens": 7}})
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, status, doc, headers=None):
                data = doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    server = FakeChatServer()
    yield server
    server.close()


def http_generator(url: str, name: str = "remote", **endpoint) -> GeneratorConfig:
    settings = {"base_url": url, "model": "fake-model", "timeout_s": 2.0, "max_retries": 3, "backoff_s": 0.01,
                **endpoint}
    return GeneratorConfig(name=name, backend="openai", endpoint=EndpointConfig(**settings),
                           sampling=SamplingConfig(max_new_tokens=16, temperature=0.5, seed=7))


# ------------------------------------------------------------------------------------------ transformers
def test_two_seeded_tiny_generators_differ_are_reproducible_and_left_padded():
    def gen(seed: int) -> TransformersGenerator:
        return TransformersGenerator(GeneratorConfig(
            name=f"tiny{seed}", model=ModelConfig(name_or_path=f"tiny:{seed}"), batch_size=3,
            sampling=SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=50, seed=3)))

    one, two = gen(1), gen(2)
    a, b = one.generate(CONVERSATIONS, seed=11), two.generate(CONVERSATIONS, seed=11)
    assert [g.text for g in a] != [g.text for g in b]  # different weights, different answers
    assert [g.text for g in a] == [g.text for g in one.generate(CONVERSATIONS, seed=11)]  # same seed, same answers
    for g in a:
        assert g.seed == 11 and g.finish_reason in {"stop", "length"} and 1 <= g.response_tokens <= 8
        assert g.finish_reason == "stop" or g.response_tokens == 8
    # Left padding: greedy answers of a padded batch equal the answers generated one prompt at a time.
    one.sampling = SamplingConfig(max_new_tokens=8, temperature=0)
    batched = one.generate(CONVERSATIONS, seed=0)
    one.batch_size = 1
    assert [g.text for g in batched] == [g.text for g in one.generate(CONVERSATIONS, seed=0)]
    assert len({g.prompt_tokens for g in batched}) == 3  # prompt lengths differ, so padding was exercised


def test_vllm_backend_selected_without_it_is_a_clear_error():
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    config = GeneratorConfig(name="v", backend="vllm", model=ModelConfig(name_or_path="tiny:1"))
    with pytest.raises(ConfigError, match=r"pomona\[vllm\]"):
        make_generator(config)


@pytest.mark.gpu
def test_vllm_generates_on_cuda():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    backend = make_generator(GeneratorConfig(name="v", backend="vllm", model=ModelConfig(name_or_path="tiny:1"),
                                             sampling=SamplingConfig(max_new_tokens=8, seed=1)))
    out = backend.generate(CONVERSATIONS, seed=5)
    assert len(out) == 3 and [g.seed for g in out] == [5, 6, 7]


def test_generator_config_checks_backend_fields():
    with pytest.raises(ValueError, match="needs 'endpoint'"):
        GeneratorConfig(name="x", backend="openai", model=ModelConfig(name_or_path="tiny:1"))
    with pytest.raises(ValueError, match="needs 'model'"):
        GeneratorConfig(name="x", backend="transformers")
    with pytest.raises(ValueError, match="metric key"):
        GeneratorConfig(name="bad name", model=ModelConfig(name_or_path="tiny:1"))


# -------------------------------------------------------------------------------------------------- HTTP
def test_http_backend_retries_with_exponential_backoff_then_answers(fake_server, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sekrit")
    fake_server.script = [(503, {}), (429, {}), (502, {})]
    delays: list[float] = []
    backend = OpenAIChatGenerator(http_generator(fake_server.url, api_key_env="FAKE_KEY"), sleep=delays.append)
    [answer] = backend.generate(CONVERSATIONS[:1], seed=40)
    assert delays == [0.01, 0.02, 0.04]  # doubled each retry
    assert answer.text == "echo What is the capital  seed=40"
    assert (answer.prompt_tokens, answer.response_tokens, answer.finish_reason) == (11, 7, "stop")
    sent = fake_server.requests[-1]
    assert sent["model"] == "fake-model" and sent["max_tokens"] == 16 and sent["temperature"] == 0.5
    assert fake_server.headers[-1]["Authorization"] == "Bearer sekrit"


def test_http_backend_honours_retry_after_and_gives_up_with_a_clear_error(fake_server):
    fake_server.script = [(503, {"Retry-After": "0.5"})] * 4
    delays: list[float] = []
    backend = OpenAIChatGenerator(http_generator(fake_server.url), sleep=delays.append)
    with pytest.raises(GenerationError, match=r"failed after 4 attempts; last error: HTTP 503"):
        backend.generate(CONVERSATIONS[:1], seed=0)
    assert delays == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_http_backend_fails_on_a_wrong_key_model_or_url_without_retrying(fake_server, status):
    """Statuses that say the endpoint itself is wrong fail the generator (and its stage): every request would."""
    fake_server.fail_after, fake_server.fail_status = 0, status
    backend = OpenAIChatGenerator(http_generator(fake_server.url), sleep=lambda s: None)
    with pytest.raises(GenerationError, match=f"refused the request .*HTTP {status}.*not retried"):
        backend.generate(CONVERSATIONS[:1], seed=0)
    assert len(fake_server.requests) == 1


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_conversation_the_server_refuses_gets_no_answer_and_the_others_go_on(fake_server, status):
    """One conversation the server refuses (a vLLM server: HTTP 400, its context exceeded) used to fail the whole
    shard and the stage; now it is not generated, says why, and is not retried."""
    fake_server.refuse_containing = "poem"  # CONVERSATIONS[1]
    fake_server.refusal = (status, fake_server.refusal[1])
    backend = OpenAIChatGenerator(http_generator(fake_server.url), sleep=lambda s: None)
    out = backend.generate(CONVERSATIONS, seed=10)
    assert [g.finish_reason for g in out] == ["stop", "server_refused", "stop"]
    assert out[0].text.startswith("echo What") and out[2].text.startswith("echo Hi")
    refused = out[1]
    assert (refused.text, refused.response_tokens, refused.seed) == ("", 0, 11)
    assert refused.refusal.startswith(f"HTTP {status} from {fake_server.url}/chat/completions: ")
    assert "maximum context length is 2048 tokens" in refused.refusal
    assert out[0].refusal is None
    assert len(fake_server.requests) == 3  # the refusal was not retried
    assert (backend.answered, backend.refused) == (2, 1)


def test_an_endpoint_given_its_tokenizer_does_not_send_a_conversation_holding_its_special_tokens(fake_server, caplog):
    """The served model's tokenizer named in the recipe: the held conversation is not sent (the server's tokenizer
    would read '<|end|>' as its control token) and says why; without it, it is sent as it is, as before."""
    import logging

    held = [{"role": "user", "content": "Say <|end|> twice."}]
    conversations = [CONVERSATIONS[0], held, CONVERSATIONS[1]]
    checked = OpenAIChatGenerator(http_generator(fake_server.url, tokenizer={"name_or_path": "tiny:0"}),
                                  sleep=lambda s: None)
    with caplog.at_level(logging.WARNING, logger="models.generation"):
        out = checked.generate(conversations, seed=20)
    assert [(g.finish_reason, g.seed) for g in out] == [("stop", 20), ("special_token", 21), ("stop", 22)]
    assert out[1].text == "" and out[2].text.startswith("echo Write")
    sent = sorted(r["messages"][0]["content"] for r in fake_server.requests)  # concurrent: any order
    assert sent == sorted(c[0]["content"] for c in CONVERSATIONS[:2])
    assert "conversation 1, the user message 1 holds '<|end|>'" in caplog.text
    assert (checked.answered, checked.refused) == (2, 0)  # the held one was never sent

    unchecked = OpenAIChatGenerator(http_generator(fake_server.url), sleep=lambda s: None)
    assert [g.finish_reason for g in unchecked.generate([held], seed=0)] == ["stop"]
    assert fake_server.requests[-1]["messages"] == held


def test_a_refusals_message_is_one_line_truncated_and_keeps_url_credentials_out(fake_server):
    fake_server.refuse_containing = "capital"
    fake_server.refusal = (400, "Bad Request\n\ncontext too long: " + "x" * 1000)  # a plain-text body
    url = fake_server.url.replace("http://", "http://alice:pa55word@")
    backend = OpenAIChatGenerator(http_generator(url), sleep=lambda s: None)
    refused, answered = backend.generate(CONVERSATIONS[:2], seed=0)
    assert refused.finish_reason == "server_refused" and answered.finish_reason == "stop"
    assert refused.refusal.split(": ", 1)[1].startswith("Bad Request context too long: xxx")
    assert "\n" not in refused.refusal and "pa55word" not in refused.refusal and "***@127.0.0.1" in refused.refusal
    assert len(refused.refusal.split(": ", 1)[1]) == 300


def test_a_server_that_refuses_every_conversation_is_a_configuration_error(fake_server):
    """Every request refused (a parameter the server does not support, a wrong max_new_tokens) is not a set of
    rejects: the generator fails with the first refusal and where to look."""
    fake_server.refuse_containing = " "  # every conversation
    fake_server.refusal = (400, {"object": "error", "message": "top_k is not supported"})
    backend = OpenAIChatGenerator(http_generator(fake_server.url), sleep=lambda s: None)
    with pytest.raises(GenerationError) as failure:
        backend.generate(CONVERSATIONS[:2], seed=0)
    message = str(failure.value)
    assert "refused all 2 conversations sent so far, none answered" in message
    assert "HTTP 400 from" in message and "top_k is not supported" in message
    assert "sampling parameters it may not support" in message
    # once the server has answered, a later call (shard) refusing everything is a set of rejects, not an error
    fake_server.refuse_containing = None
    assert backend.generate(CONVERSATIONS[:1], seed=0)[0].finish_reason == "stop"
    fake_server.refuse_containing = " "
    assert [g.finish_reason for g in backend.generate(CONVERSATIONS[:2], seed=0)] == ["server_refused"] * 2


def test_http_backend_times_out_and_limits_concurrency(fake_server):
    fake_server.delay_s = 0.6
    slow = OpenAIChatGenerator(http_generator(fake_server.url, timeout_s=0.2, max_retries=1), sleep=lambda s: None)
    with pytest.raises(GenerationError, match="ReadTimeout"):
        slow.generate(CONVERSATIONS[:1], seed=0)
    while fake_server.in_flight:  # let the timed-out requests finish on the server side
        time.sleep(0.05)
    fake_server.delay_s = 0.15
    fake_server.max_in_flight = 0
    backend = OpenAIChatGenerator(http_generator(fake_server.url, concurrency=2))
    out = backend.generate(CONVERSATIONS * 2, seed=100)
    assert fake_server.max_in_flight == 2  # six requests, never more than two at once
    assert [g.seed for g in out] == [100, 101, 102, 103, 104, 105]  # one seed per request, in order
    assert [g.text.split(" seed=")[1] for g in out] == ["100", "101", "102", "103", "104", "105"]


def test_missing_api_key_is_a_config_error(fake_server, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY"):
        OpenAIChatGenerator(http_generator(fake_server.url, api_key_env="NO_SUCH_KEY"))


# ---------------------------------------------------------------------------------------- stage: generate
def test_generate_stage_resumes_at_the_failed_shard(fake_server):
    records = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=10), require_response=False)
    generator = http_generator(fake_server.url, name="remote-resume", max_retries=0, concurrency=1)
    fake_server.fail_after, fake_server.fail_status = 6, 401  # shards of 4: shard 1 is refused at its 3rd request
    with pytest.raises(GenerationError, match="refused"):
        generate_candidates(records, generator, shard_size=4, progress=False)
    assert len(fake_server.requests) == 7
    fake_server.fail_after = None
    out = generate_candidates(records, generator, shard_size=4, progress=False)
    assert out.metrics["shards"] == 3 and out.metrics["shards_resumed"] == 1 and out.metrics["responses"] == 10
    assert len(fake_server.requests) == 7 + 6  # shard 0 was not asked again
    rows = read_parquet(out.file("generated.parquet"))
    assert len({r["instruction_id"] for r in rows}) == 10
    params = json.loads(rows[0]["params"])
    assert params["backend"] == "openai" and params["temperature"] == 0.5 and params["seed"] == 7
    assert params["seed_scope"] == "request" and "sekrit" not in rows[0]["params"]
    assert all(r["response"].startswith("echo ") and r["response_tokens"] == 7 for r in rows)
    # the seeds of one shard run on from the shard's derived seed
    shard0 = [r["seed"] for r in rows[:4]]
    assert shard0 == list(range(shard0[0], shard0[0] + 4))
    again = generate_candidates(records, generator, shard_size=4, progress=False)
    assert again.digest == out.digest and len(fake_server.requests) == 13  # finished: nothing re-sent


def test_a_refused_conversation_is_counted_by_the_stage_and_rejected_by_grape_fit_with_the_servers_message(
        fake_server, tiny_model_dir):
    """Generate (one conversation refused with HTTP 400) -> candidates -> grape-fit: the stage finishes, counts the
    refusal, and the fit stage's reject for that candidate holds the status and the server's message."""
    from configs.grape import GrapeSelection
    from tasks.data import read_jsonl
    from tasks.generate import collect_candidates
    from tasks.grape import score_candidate_fit

    records = prepare_records(DataConfig(path=str(DATA / "alpaca_cherry_40.json"), limit=6), require_response=False)
    fake_server.refuse_containing = "critique"  # record 2, in shard 0
    generator = http_generator(fake_server.url, name="remote-refusal", max_retries=0)
    out = generate_candidates(records, generator, shard_size=3, progress=False)
    assert out.metrics["responses"] == 6 and out.metrics["finish_reason/server_refused"] == 1
    assert out.metrics["finish_reason/stop"] == 5
    assert "answered 5 of 6" in out.summary and "1 conversations were refused by the server" in out.summary
    assert "maximum context length is 2048 tokens" in out.summary
    rows = read_parquet(out.file("generated.parquet"))
    [refused] = [r for r in rows if r["finish_reason"] == "server_refused"]
    assert refused["response"] == "" and refused["refusal"].startswith("HTTP 400 from http://127.0.0.1:")
    assert all(r["refusal"] is None for r in rows if r is not refused)

    candidates = collect_candidates(records, [out])
    assert read_parquet(candidates.file("candidates.parquet"))[2]["refusal"] == refused["refusal"]
    target = ModelConfig(name_or_path=str(tiny_model_dir))
    fit = score_candidate_fit(candidates, GrapeSelection(target=target, generators=[generator]), progress=False)
    [reject] = read_jsonl(fit.file("rejects.jsonl"))
    assert reject["field"] == "candidate 0 (remote-refusal)"
    assert reject["reason"].startswith("not generated: the generator's server refused this conversation (HTTP 400 ")
    assert "maximum context length" in reject["reason"] and reject["reason"].endswith("(finish_reason server_refused)")
    assert fit.metrics["rejected[not generated]"] == 1 and fit.metrics["candidates_scored"] == 5


def test_http_backend_keeps_url_credentials_out_of_its_errors_and_joins_the_path_before_the_query(fake_server):
    # userinfo is sent as basic auth by httpx; a query (api_key=...) must follow the path, not swallow it
    url = fake_server.url.replace("http://", "http://alice:pa55word@") + "?api_key=SECRETKEY"
    backend = OpenAIChatGenerator(http_generator(url, max_retries=0), sleep=lambda s: None)
    assert backend.url.endswith("/v1/chat/completions?api_key=SECRETKEY")
    with pytest.raises(GenerationError) as failure:  # the fake server answers 404 to a path with a query
        backend.generate(CONVERSATIONS[:1], seed=0)
    message = str(failure.value)
    assert "127.0.0.1" in message and "pa55word" not in message and "SECRETKEY" not in message
    assert fake_server.headers[0]["Authorization"].startswith("Basic ")


def test_a_conversation_longer_than_the_generators_context_gets_no_answer_and_says_why(tmp_path):
    """Real multi-turn ShareGPT conversations outgrow a small model's context (the tiny model: 2,048 positions):
    the generator answered them anyway, past its positions, and the answer looked like any other."""
    from models.fit import render_prompt
    from tasks.data import read_records
    from tasks.generate import instruction_messages

    # instructions for generation: an unanswered last turn is welcome (record 9 has 13 turns, 4,000+ tokens)
    records = read_records(DATA / "sharegpt_v3_41.json", on_error="skip", require_response=False).records
    generator = TransformersGenerator(GeneratorConfig(
        name="tiny0", model=ModelConfig(name_or_path="tiny:0"), batch_size=4,
        sampling=SamplingConfig(max_new_tokens=4, temperature=0)))
    tokens = [len(generator.tokenizer(render_prompt(generator.tokenizer, instruction_messages(r)),
                                      add_special_tokens=False)["input_ids"]) for r in records]
    order = sorted(range(len(records)), key=tokens.__getitem__)
    longest, short = order[-1], order[:2]
    assert tokens[longest] > generator.context == 2048
    picked = [short[0], longest, short[1]]
    out = generator.generate([instruction_messages(records[i]) for i in picked], seed=0)
    assert out[1].finish_reason == "context_overflow" and out[1].text == "" and out[1].prompt_tokens == tokens[longest]
    assert [g.finish_reason for g in (out[0], out[2])] != ["context_overflow"] * 2
    alone = generator.generate([instruction_messages(records[i]) for i in short], seed=0)
    assert [g.text for g in alone] == [out[0].text, out[2].text]  # the others answered as without it

    path = tmp_path / "three.json"
    path.write_text(json.dumps([records[i].source for i in picked]))
    stage = generate_candidates(prepare_records(DataConfig(path=str(path)), require_response=False), GeneratorConfig(
        name="tiny0", model=ModelConfig(name_or_path="tiny:0"), sampling=SamplingConfig(max_new_tokens=4, temperature=0)),
        progress=False)
    assert stage.metrics["finish_reason/context_overflow"] == 1
    assert "answered 2 of 3 instructions" in stage.summary and "1 conversations do not fit" in stage.summary


def test_a_conversation_the_generators_template_refuses_gets_no_answer_and_says_why():
    """A ShareGPT system turn under a template that raises on it (Gemma's, Mistral's): the generate call died with
    a Jinja traceback, losing the shard, instead of skipping that conversation."""
    from tasks.data import read_records
    from tasks.generate import instruction_messages

    records = read_records(DATA / "sharegpt_v3_41.json", on_error="skip").records
    system = next(r for r in records if r.system)
    plain = [r for r in records if not r.system and len(r.messages) == 2][:2]
    generator = TransformersGenerator(GeneratorConfig(
        name="tiny0", model=ModelConfig(name_or_path="tiny:0"), batch_size=4,
        sampling=SamplingConfig(max_new_tokens=4, temperature=0)))
    conversations = [instruction_messages(r) for r in (plain[0], system, plain[1])]
    expected = generator.generate([conversations[0], conversations[2]], seed=0)
    generator.tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role "
                                         "not supported') }}{% endif %}" + generator.tokenizer.chat_template)
    out = generator.generate(conversations, seed=0)
    assert out[1].finish_reason == "template_refused" and out[1].text == ""
    assert [out[0].text, out[2].text] == [g.text for g in expected]


# ------------------------------------------------------------------------------------------ vLLM, faked
class FakeVllmEngine:
    """What VllmGenerator uses of a vllm.LLM: its tokenizer, its max_model_len, and `chat` (which records what it was
    sent and answers like vLLM: one RequestOutput-like object per conversation, in order)."""

    def __init__(self, tokenizer, max_model_len: int):
        from types import SimpleNamespace

        self.tokenizer = tokenizer
        self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=max_model_len))
        self.sent: list = []

    def get_tokenizer(self):
        return self.tokenizer

    def chat(self, conversations, params, use_tqdm=False):
        from types import SimpleNamespace

        assert len(conversations) == len(params)
        self.sent.append((list(conversations), [p.kwargs["seed"] for p in params]))
        return [SimpleNamespace(prompt_token_ids=[0] * 5, outputs=[SimpleNamespace(
            text=f"answer to {c[-1]['content'][:10]}", token_ids=[1, 2], finish_reason="stop")]) for c in conversations]


def test_vllm_skips_the_conversations_its_context_or_template_cannot_take_with_the_shared_check(monkeypatch):
    """vLLM raises on a prompt longer than max_model_len (the shard was lost) and one template refusal failed the
    whole chat call: those conversations get no answer and say why, the others are generated as before."""
    import sys
    from types import ModuleType, SimpleNamespace

    from models.fit import render_prompt
    from models.generation import VllmGenerator, screen_conversations
    from models.loading import load_tokenizer

    fake_vllm = ModuleType("vllm")
    fake_vllm.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    tokenizer = load_tokenizer(ModelConfig(name_or_path="tiny:0"))
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}" + tokenizer.chat_template)
    long = [{"role": "user", "content": "Tell me about the sea. " * 40}]
    conversations = [CONVERSATIONS[0], long, CONVERSATIONS[2], CONVERSATIONS[1]]
    sizes = [len(tokenizer(render_prompt(tokenizer, c), add_special_tokens=False)["input_ids"])
             for c in (CONVERSATIONS[0], long, CONVERSATIONS[1])]
    context = max(sizes[0], sizes[2]) + 8  # the short ones and 8 new tokens fit, the long one does not
    assert sizes[1] + 8 > context

    generator = VllmGenerator.__new__(VllmGenerator)  # no vLLM here: the engine is the fake
    engine = FakeVllmEngine(tokenizer, context)
    generator._bind("v", SamplingConfig(max_new_tokens=8, seed=1), engine)
    out = generator.generate(conversations, seed=100)
    assert [g.finish_reason for g in out] == ["stop", "context_overflow", "template_refused", "stop"]
    assert out[1].text == out[2].text == "" and out[1].prompt_tokens == sizes[1] and out[1].response_tokens == 0
    assert [g.seed for g in out] == [100, 101, 102, 103]  # a request's seed is its place in the shard, sent or not
    assert engine.sent == [([CONVERSATIONS[0], CONVERSATIONS[1]], [100, 103])]
    assert out[3].text == "answer to " + CONVERSATIONS[1][-1]["content"][:10]
    # the same rule as the transformers backend: one shared function decides
    _, skipped = screen_conversations(tokenizer, conversations, context, 8, [0] * 4)
    assert {i: g.finish_reason for i, g in skipped.items()} == {1: "context_overflow", 2: "template_refused"}
    # nothing left to send: vLLM is not called with an empty batch
    engine.sent.clear()
    assert [g.finish_reason for g in generator.generate([long], seed=0)] == ["context_overflow"]
    assert engine.sent == []


def test_a_conversation_holding_a_special_tokens_text_is_not_generated_and_says_why(tmp_path, caplog):
    """Two ShareGPT V3 replies end in the text '<|endoftext|>': the generator's tokenizer read it as that control
    token, so the model answered another conversation than the user's. Here the tiny tokenizer's '<|end|>' stands
    in: that conversation gets no answer (finish_reason special_token), the others are generated as without it, on
    both local backends (one shared check); the generate stage counts it and says why."""
    import logging
    import sys
    from types import ModuleType, SimpleNamespace

    from models.generation import VllmGenerator, screen_conversations

    held = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Skipped 1 messages<|end|>"},
            {"role": "user", "content": "Go on."}]
    generator = TransformersGenerator(GeneratorConfig(
        name="tiny0", model=ModelConfig(name_or_path="tiny:0"), batch_size=4,
        sampling=SamplingConfig(max_new_tokens=4, temperature=0)))
    expected = generator.generate([CONVERSATIONS[0], CONVERSATIONS[1]], seed=0)
    with caplog.at_level(logging.WARNING, logger="models.generation"):
        out = generator.generate([CONVERSATIONS[0], held, CONVERSATIONS[1]], seed=0)
    assert (out[1].text, out[1].finish_reason, out[1].response_tokens) == ("", "special_token", 0)
    assert [out[0].text, out[2].text] == [g.text for g in expected]
    assert "conversation 1, the assistant message 2 holds '<|end|>'" in caplog.text
    _, skipped = screen_conversations(generator.tokenizer, [CONVERSATIONS[2], held], None, 4, [5, 6])
    assert {i: (g.finish_reason, g.seed) for i, g in skipped.items()} == {1: ("special_token", 6)}

    fake_vllm = ModuleType("vllm")
    fake_vllm.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    sys.modules.setdefault("vllm", fake_vllm)
    try:
        vllm = VllmGenerator.__new__(VllmGenerator)
        engine = FakeVllmEngine(generator.tokenizer, 2048)
        vllm._bind("v", SamplingConfig(max_new_tokens=8, seed=1), engine)
        answers = vllm.generate([held, CONVERSATIONS[0]], seed=10)
        assert [g.finish_reason for g in answers] == ["special_token", "stop"]
        assert engine.sent == [([CONVERSATIONS[0]], [11])]  # the held one is not sent
    finally:
        if sys.modules.get("vllm") is fake_vllm:
            del sys.modules["vllm"]

    rows = [{"conversations": [{"from": "human", "value": "What is the capital of France?"}]},
            {"conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Skipped 1 messages<|end|>"},
                               {"from": "human", "value": "Go on."}]}]
    path = tmp_path / "held.json"
    path.write_text(json.dumps(rows))
    stage = generate_candidates(prepare_records(DataConfig(path=str(path)), require_response=False), GeneratorConfig(
        name="tiny0", model=ModelConfig(name_or_path="tiny:0"), sampling=SamplingConfig(max_new_tokens=4, temperature=0)),
        progress=False)
    assert stage.metrics["finish_reason/special_token"] == 1
    generated = read_parquet(stage.file("generated.parquet"))
    assert [r["finish_reason"] == "special_token" for r in generated] == [False, True] and generated[1]["response"] == ""
    assert "answered 1 of 2 instructions" in stage.summary
    assert "1 conversations hold one of the generator's special tokens as text" in stage.summary


@pytest.fixture
def fake_vllm_llm(monkeypatch, tiny_model_dir) -> list[dict]:
    """A `vllm` module whose LLM records the keyword arguments it is built with (the list returned) and serves the
    tiny tokenizer at the asked max_model_len; CUDA reported present. No vLLM or GPU is needed."""
    import sys
    from types import ModuleType

    import torch

    from models.loading import load_tokenizer

    asked: list[dict] = []

    def fake_llm(**kwargs):
        asked.append(kwargs)
        return FakeVllmEngine(load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir))),
                              kwargs.get("max_model_len") or 2048)

    fake_vllm = ModuleType("vllm")
    fake_vllm.LLM = fake_llm
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return asked


def test_vllm_runs_dtype_auto_in_bfloat16_as_the_transformers_backend(fake_vllm_llm, tiny_model_dir):
    """pomona's dtype 'auto' is bfloat16 on CUDA; vLLM's own 'auto' runs a float32 checkpoint (the tiny model,
    SmolLM2 imported from GGUF, a full fine-tune saved in float32) in float16, so the backends generated in
    different precisions and float16 can overflow. A fake vLLM records what the generator asks of it."""
    from models.generation import VllmGenerator

    model, asked = ModelConfig(name_or_path=str(tiny_model_dir)), fake_vllm_llm
    for dtype, expected in [("auto", "bfloat16"), ("float16", "float16"), ("float32", "float32")]:
        VllmGenerator(GeneratorConfig(name="v", backend="vllm", model=model.model_copy(update={"dtype": dtype})))
        assert asked[-1]["dtype"] == expected, dtype


def test_vllm_engine_settings_reach_the_engine_and_apply_to_vllm_only(fake_vllm_llm, tiny_model_dir):
    """tensor_parallel_size / gpu_memory_utilization / max_model_len go to vllm.LLM (a fake here, no vLLM); they are
    refused on another backend (silently ignored there); closing drops the engine for the next generator."""
    from pydantic import ValidationError

    from configs.grape import VllmSettings
    from models.generation import VllmGenerator
    from tasks.store import keyed_config

    model, asked = ModelConfig(name_or_path=str(tiny_model_dir)), fake_vllm_llm
    config = GeneratorConfig(name="v", backend="vllm", model=model,
                             vllm={"tensor_parallel_size": 4, "gpu_memory_utilization": 0.45, "max_model_len": 512})
    generator = VllmGenerator(config)
    assert {k: asked[-1][k] for k in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len")} == {
        "tensor_parallel_size": 4, "gpu_memory_utilization": 0.45, "max_model_len": 512}
    assert generator.context == 512  # the conversation check follows the engine's context
    generator.close()
    assert generator.llm is None
    VllmGenerator(GeneratorConfig(name="v", backend="vllm", model=model))
    assert (asked[-1]["tensor_parallel_size"], asked[-1]["gpu_memory_utilization"], asked[-1]["max_model_len"]) == (
        1, 0.9, None)
    # the GPU split is not in the cache key (same answers); the context is (it decides which are sent)
    plain = GeneratorConfig(name="v", backend="vllm", model=model)
    assert keyed_config(plain) == keyed_config(plain.model_copy(update={"vllm": VllmSettings(
        tensor_parallel_size=4, gpu_memory_utilization=0.45)}))
    assert keyed_config(plain) != keyed_config(plain.model_copy(update={"vllm": VllmSettings(max_model_len=512)}))
    with pytest.raises(ValidationError, match="'vllm' settings apply to backend 'vllm' only"):
        GeneratorConfig(name="t", model=model, vllm={"tensor_parallel_size": 2})
