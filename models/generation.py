"""Response generation backends: transformers (batched), vLLM (optional, CUDA) and OpenAI-compatible HTTP.

Every backend takes conversations (role/content messages ending with a user turn) and a seed, and returns one
`Generation` per conversation, in order, with token counts and why it stopped. A backend either answers every
conversation of a call or raises `GenerationError`: the caller writes whole shards, so a failure never leaves a
half-written shard and a rerun resumes at the first missing one. A conversation the backend cannot answer on its
own account (too long for the context, refused by the chat template or by the server) is not a failure: its
`Generation` has no text and a `finish_reason` saying why, and it becomes a reject downstream.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from configs.errors import ConfigError, PomonaError
from configs.grape import EndpointConfig, GeneratorConfig, SamplingConfig
from configs.redact import redact_url

log = logging.getLogger(__name__)
Messages = list[dict[str, str]]
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
REFUSED_STATUS = frozenset({400, 413, 422})
"""HTTP statuses that refuse one request for what it holds (too long, a body the server rejects): that conversation
is not generated and the others go on. Other 4xx (401, 403, 404, ...) say the endpoint, key or model is wrong and
fail the generator."""


class GenerationError(PomonaError):
    """A generator could not answer (endpoint down after retries, a malformed reply, a failed model)."""


CONTEXT_OVERFLOW = "context_overflow"
"""finish_reason of a conversation whose prompt + max_new_tokens exceed the generator's context: not generated."""
TEMPLATE_REFUSED = "template_refused"
"""finish_reason of a conversation the generator's chat template refuses to render (it raised): not generated."""
SERVER_REFUSED = "server_refused"
"""finish_reason of a conversation an OpenAI-compatible server refused (HTTP 400, 413 or 422, e.g. longer than the
served model's context): not generated; `Generation.refusal` holds the status and the server's message."""
SPECIAL_TOKEN = "special_token"
"""finish_reason of a conversation one of whose messages holds one of the generator's special tokens as text (the
tokenizer would read "<|endoftext|>" in a ShareGPT reply as that control token): not generated."""


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int | None
    response_tokens: int | None
    finish_reason: str
    seed: int
    refusal: str | None = None  # SERVER_REFUSED: "HTTP 400 from <url>: <the server's message, truncated>"


def derive_seed(base: int, *parts: object) -> int:
    """A stable 31-bit seed from a base seed and a position (shard, request): same inputs, same seed, anywhere."""
    digest = hashlib.sha256(":".join(str(p) for p in (base, *parts)).encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


class Generator(Protocol):
    name: str

    def generate(self, conversations: Sequence[Messages], seed: int, progress: bool = False) -> list[Generation]: ...

    def close(self) -> None: ...


def screen_conversations(tokenizer, conversations: Sequence[Messages], context: int | None, max_new_tokens: int,
                         seeds: Sequence[int]) -> tuple[list[str], dict[int, Generation]]:
    """Render every conversation's generation prompt under the generator's chat template, before any is generated.

    Returns the prompt texts ("" for a skipped one) and, by index, the `Generation` (no text) of each conversation
    that is not generated: one of its messages holds one of the tokenizer's special tokens as text (the prompt would
    hold that control token, not the user's text; `models/special_tokens.py`): `special_token`; the template refuses
    it (a system turn for Gemma's): `template_refused`; or its prompt + `max_new_tokens` exceed the generator's
    `context` (generating past it gives garbage from a rotary model and an index error from one with learned
    positions): `context_overflow`. The other conversations are unaffected. `seeds[i]` is the seed recorded for
    conversation i.
    """
    from jinja2 import TemplateError

    from models.fit import render_prompt
    from models.special_tokens import special_token_pattern

    skipped = hold_special_tokens(special_token_pattern(tokenizer), conversations, seeds)
    texts: list[str] = []
    for i, c in enumerate(conversations):
        if i in skipped:
            texts.append("")
            continue
        try:
            texts.append(render_prompt(tokenizer, c))
        except TemplateError:
            texts.append("")
            skipped[i] = Generation("", None, 0, TEMPLATE_REFUSED, seeds[i])
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    for i, n in enumerate(lengths):
        if i not in skipped and context is not None and n + max_new_tokens > context:
            skipped[i] = Generation("", n, 0, CONTEXT_OVERFLOW, seeds[i])
    return texts, skipped


def hold_special_tokens(pattern, conversations: Sequence[Messages], seeds: Sequence[int]) -> dict[int, Generation]:
    """By index, a `Generation` with no text (finish_reason `special_token`) for each conversation whose messages
    hold one of the tokenizer's special tokens (`pattern`, `models/special_tokens.py`) as text; warned about once,
    naming the first. Only the user's texts count: a chat template's own control tokens are what it is for."""
    from models.special_tokens import first_special_token, message_texts

    held = {}
    for i, c in enumerate(conversations):
        hit = first_special_token(message_texts(c), pattern)
        if hit:
            held[i] = hit
    if held:
        i, (where, token) = next(iter(held.items()))
        log.warning("%d of %d conversations hold one of the generator's special tokens as text and are not generated "
                    "(finish_reason %s; first: conversation %d, %s holds %r)", len(held), len(conversations),
                    SPECIAL_TOKEN, i, where, token)
    return {i: Generation("", None, 0, SPECIAL_TOKEN, seeds[i]) for i in held}


# ---------------------------------------------------------------------------------------------- transformers
class TransformersGenerator:
    """Batched `generate` with left padding under the model's chat template; the shard seed seeds torch once."""

    def __init__(self, config: GeneratorConfig):
        from models.loading import load_model

        self.name = config.name
        self.sampling = config.sampling
        self.batch_size = config.batch_size
        self.model, self.tokenizer = load_model(config.model)
        self.tokenizer.padding_side = "left"  # generation continues from the last position of every row
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.context = getattr(self.model.config, "max_position_embeddings", None)

    def _decoding_kwargs(self) -> dict:
        s = self.sampling
        if s.temperature == 0:
            return {"do_sample": False, "repetition_penalty": s.repetition_penalty}
        # Explicit values everywhere: a checkpoint's generation_config must not change what was recorded.
        return {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k or 0,
                "repetition_penalty": s.repetition_penalty}

    def generate(self, conversations: Sequence[Messages], seed: int, progress: bool = False) -> list[Generation]:
        import torch
        from tqdm.auto import tqdm

        torch.manual_seed(seed)
        texts, answers = screen_conversations(self.tokenizer, conversations, self.context,
                                              self.sampling.max_new_tokens, [seed] * len(conversations))
        fits = [i for i in range(len(texts)) if i not in answers]
        device = next(self.model.parameters()).device
        for start in tqdm(range(0, len(fits), self.batch_size), desc=f"generate {self.name}", disable=not progress):
            rows = fits[start:start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in rows], add_special_tokens=False, padding=True,
                                   return_tensors="pt").to(device)
            with torch.no_grad():
                ids = self.model.generate(**batch, max_new_tokens=self.sampling.max_new_tokens,
                                          pad_token_id=self.tokenizer.pad_token_id, **self._decoding_kwargs())
            width = batch["input_ids"].shape[1]
            prompt_lengths = batch["attention_mask"].sum(-1).tolist()
            for row, new in enumerate(ids[:, width:].tolist()):
                stop = next((i for i, t in enumerate(new) if t in self.eos_ids), None)
                kept = new if stop is None else new[:stop]
                text = self.tokenizer.decode(kept, skip_special_tokens=True)
                answers[rows[row]] = Generation(text, int(prompt_lengths[row]), len(new) if stop is None else stop + 1,
                                                "length" if stop is None else "stop", seed)
        return [answers[i] for i in range(len(texts))]

    def close(self) -> None:
        self.model = None  # let the weights go before the next generator loads


# ------------------------------------------------------------------------------------------------------ vLLM
class VllmGenerator:
    """vLLM offline inference (optional extra `pomona[vllm]`, CUDA only); one seed per request."""

    def __init__(self, config: GeneratorConfig):
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"generator {config.name!r}: backend 'vllm' needs the optional extra "
                              "(pip install 'pomona[vllm]') on a CUDA machine; use backend 'transformers' or serve the "
                              "model with any OpenAI-compatible server and use backend 'openai'")
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"generator {config.name!r}: backend 'vllm' needs a CUDA GPU and none is visible")
        if config.model.gguf_file:
            raise ConfigError(f"generator {config.name!r}: backend 'vllm' does not load gguf_file here; "
                              "import the model into a folder first (pomona import-smollm2 / save_pretrained)")
        from vllm import LLM

        from models.loading import resolve_model_path

        # pomona's 'auto' is bfloat16 on CUDA, as the transformers backend loads it; vLLM's own 'auto' runs a float32
        # checkpoint (an imported GGUF, a full fine-tune saved in float32) in float16, which can overflow
        dtype = "bfloat16" if config.model.dtype == "auto" else config.model.dtype
        engine = config.vllm
        self._bind(config.name, config.sampling, LLM(
            model=resolve_model_path(config.model), dtype=dtype, seed=config.sampling.seed,
            trust_remote_code=config.model.trust_remote_code, tensor_parallel_size=engine.tensor_parallel_size,
            gpu_memory_utilization=engine.gpu_memory_utilization, max_model_len=engine.max_model_len))

    def _bind(self, name: str, sampling: SamplingConfig, llm) -> None:
        """Use `llm` (a vllm.LLM), its tokenizer and its context (max_model_len) for the conversation checks."""
        self.name = name
        self.sampling = sampling
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.context = llm.llm_engine.model_config.max_model_len

    def generate(self, conversations: Sequence[Messages], seed: int, progress: bool = False) -> list[Generation]:
        from vllm import SamplingParams

        s = self.sampling
        # vLLM raises on a prompt longer than max_model_len (losing the shard) and cuts an answer at it; a template
        # that refuses one conversation fails the whole call: those conversations are not sent, said in their rows.
        _, answers = screen_conversations(self.tokenizer, conversations, self.context, s.max_new_tokens,
                                          [seed + i for i in range(len(conversations))])
        fits = [i for i in range(len(conversations)) if i not in answers]
        params = [SamplingParams(n=1, max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                 top_k=s.top_k or -1, repetition_penalty=s.repetition_penalty, seed=seed + i)
                  for i in fits]
        results = self.llm.chat([conversations[i] for i in fits], params, use_tqdm=progress) if fits else []
        if len(results) != len(fits):
            raise GenerationError(f"generator {self.name!r}: vLLM returned {len(results)} results for "
                                  f"{len(fits)} conversations")
        for i, res in zip(fits, results):
            choice = res.outputs[0]
            answers[i] = Generation(choice.text, len(res.prompt_token_ids), len(choice.token_ids),
                                    str(choice.finish_reason), seed + i)
        return [answers[i] for i in range(len(conversations))]

    def close(self) -> None:
        """Give the engine's GPU memory back before the next generator loads: GRAPE runs its generators one after
        another in one process, and an engine holds `gpu_memory_utilization` of the GPU until it is collected."""
        import gc

        import torch

        self.llm = self.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------ HTTP
class OpenAIChatGenerator:
    """POST <base_url>/chat/completions with retries (exponential backoff), a concurrency limit and timeouts."""

    def __init__(self, config: GeneratorConfig, sleep=time.sleep):
        import httpx

        self.name = config.name
        self.endpoint: EndpointConfig = config.endpoint
        self.sampling: SamplingConfig = config.sampling
        self._sleep = sleep
        headers = {"Content-Type": "application/json"}
        if self.endpoint.api_key_env:
            key = os.environ.get(self.endpoint.api_key_env)
            if not key:
                raise ConfigError(f"generator {self.name!r}: environment variable {self.endpoint.api_key_env} "
                                  "(endpoint.api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(headers=headers, timeout=httpx.Timeout(self.endpoint.timeout_s),
                                   limits=httpx.Limits(max_connections=self.endpoint.concurrency))
        # Joined on the path: a base_url with a query (`?api_key=...`, `?api-version=...`) keeps it after the path.
        base = urlsplit(self.endpoint.base_url)
        self.url = urlunsplit(base._replace(path=base.path.rstrip("/") + "/chat/completions"))
        self.shown_url = redact_url(self.url)  # for messages: a user:password or api_key in the URL stays out of logs
        self.special_tokens = None  # the served model's special tokens, when the recipe names its tokenizer
        if self.endpoint.tokenizer is not None:
            from models.loading import load_tokenizer
            from models.special_tokens import special_token_pattern

            self.special_tokens = special_token_pattern(load_tokenizer(self.endpoint.tokenizer))
        self._in_flight = 0
        self.max_in_flight = 0  # observed, for the summary (and the concurrency test)
        self._lock = threading.Lock()
        self.answered = 0  # conversations answered and refused so far: all refused is a configuration problem
        self.refused = 0
        self.first_refusal: str | None = None

    def _body(self, messages: Messages, seed: int) -> dict:
        s = self.sampling
        body = {"model": self.endpoint.model, "messages": messages, "max_tokens": s.max_new_tokens,
                "temperature": s.temperature, "top_p": s.top_p, "seed": seed, "n": 1}
        if s.top_k is not None:  # not in the OpenAI API; vLLM and llama.cpp servers accept it
            body["top_k"] = s.top_k
        if s.repetition_penalty != 1.0:
            body["repetition_penalty"] = s.repetition_penalty
        return body

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), self.endpoint.max_backoff_s)
            except ValueError:
                pass  # an HTTP-date Retry-After: fall back to our own schedule
        return min(self.endpoint.backoff_s * 2 ** attempt, self.endpoint.max_backoff_s)

    def request(self, messages: Messages, seed: int) -> Generation:
        """One chat completion, retried on timeouts, connection errors, 408/409/429 and 5xx.

        HTTP 400, 413 and 422 refuse this conversation (the server's wording varies, so it is kept, not parsed): it
        gets no answer (finish_reason `server_refused`, the status and message in `refusal`). Any other status
        fails the generator."""
        import httpx

        last = "no attempt"
        for attempt in range(self.endpoint.max_retries + 1):
            retry_after = None
            with self._lock:
                self._in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self._in_flight)
            try:
                response = self.client.post(self.url, json=self._body(messages, seed))
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                response = None
            finally:
                with self._lock:
                    self._in_flight -= 1
            if response is not None:
                if response.status_code == 200:
                    return self._parse(response, seed)
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code in REFUSED_STATUS:
                    message = " ".join(response.text.split())[:300]
                    return Generation("", None, 0, SERVER_REFUSED, seed,
                                      refusal=f"HTTP {response.status_code} from {self.shown_url}: {message}")
                if response.status_code not in RETRYABLE_STATUS:
                    raise GenerationError(f"generator {self.name!r}: {self.shown_url} refused the request ({last}); "
                                          "not retried: check the endpoint, model name and API key")
                retry_after = response.headers.get("Retry-After")
            if attempt < self.endpoint.max_retries:
                self._sleep(self._delay(attempt, retry_after))
        raise GenerationError(f"generator {self.name!r}: {self.shown_url} failed after {self.endpoint.max_retries + 1} "
                              f"attempts; last error: {last}")

    def _parse(self, response, seed: int) -> Generation:
        try:
            doc = response.json()
            choice = doc["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"message.content is {type(text).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise GenerationError(f"generator {self.name!r}: {self.shown_url} answered 200 with an unexpected body "
                                  f"({type(exc).__name__}: {exc}): {response.text[:300]}") from None
        usage = doc.get("usage") or {}
        return Generation(text, usage.get("prompt_tokens"), usage.get("completion_tokens"),
                          str(choice.get("finish_reason")), seed)

    def generate(self, conversations: Sequence[Messages], seed: int, progress: bool = False) -> list[Generation]:
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        failed = threading.Event()

        def one(messages: Messages, request_seed: int) -> Generation | None:
            if failed.is_set():  # after the first failure the shard is lost anyway: send nothing more
                return None
            try:
                return self.request(messages, request_seed)
            except GenerationError:
                failed.set()
                raise

        held = hold_special_tokens(self.special_tokens, conversations, [seed + i for i in range(len(conversations))])
        sent = [i for i in range(len(conversations)) if i not in held]
        pool = ThreadPoolExecutor(max_workers=self.endpoint.concurrency, thread_name_prefix=f"gen-{self.name}")
        try:
            futures = [pool.submit(one, conversations[i], seed + i) for i in sent]
            answers = [f.result() for f in tqdm(futures, desc=f"generate {self.name}", disable=not progress)]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        self._count_refusals(answers)
        held.update(zip(sent, answers))
        return [held[i] for i in range(len(conversations))]

    def _count_refusals(self, out: list[Generation]) -> None:
        """Raise when the server has refused every conversation this generator sent (none answered yet): one
        conversation too long is a reject, all of them refused is a request the server never accepts."""
        refusals = [g.refusal for g in out if g.finish_reason == SERVER_REFUSED]
        with self._lock:  # shards on a thread runner share this generator
            self.refused += len(refusals)
            self.answered += len(out) - len(refusals)
            if refusals and self.first_refusal is None:
                self.first_refusal = refusals[0]
            all_refused = self.refused and not self.answered
        if all_refused:
            raise GenerationError(
                f"generator {self.name!r}: the server refused all {self.refused} conversations sent so far, none "
                f"answered; the first: {self.first_refusal}. A server that refuses every request is misconfigured "
                f"for it: check endpoint.model, sampling parameters it may not support (top_k, "
                f"repetition_penalty, seed) and sampling.max_new_tokens against the served model's context")

    def close(self) -> None:
        self.client.close()


def make_generator(config: GeneratorConfig) -> Generator:
    """The backend a generator config names, ready to generate."""
    if config.backend == "transformers":
        return TransformersGenerator(config)
    if config.backend == "vllm":
        return VllmGenerator(config)
    if config.backend == "openai":
        return OpenAIChatGenerator(config)
    raise ConfigError(f"unknown generation backend {config.backend!r}")


def generation_params(config: GeneratorConfig) -> dict:
    """What a candidate row records about how it was generated (never an API key, nor a secret in the URL)."""
    params = {"backend": config.backend, **config.sampling.model_dump(),
              "seed_scope": "shard" if config.backend == "transformers" else "request"}
    if config.model is not None:
        params["model"] = config.model.name_or_path
    if config.endpoint is not None:
        params.update({"endpoint": redact_url(config.endpoint.base_url), "model": config.endpoint.model})
    return params


__all__ = ["CONTEXT_OVERFLOW", "SERVER_REFUSED", "TEMPLATE_REFUSED", "Generation", "GenerationError",
           "OpenAIChatGenerator", "TransformersGenerator", "VllmGenerator",
           "derive_seed", "generation_params", "hold_special_tokens", "make_generator", "screen_conversations"]
