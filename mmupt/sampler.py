"""Sample n completions for chat messages with images, from a local model or a rollout server.

The one function everything that samples outside training uses (`mmupt eval`, question
synthesis): `sampler.complete(requests)`, where a request is OpenAI-style messages (images as
`image_url` parts, see `image_part`) plus sampling parameters. `LocalSampler` loads the model in
this process (the transformers or vLLM backend); `HTTPSampler` calls `/v1/chat/completions` of a
running rollout server. Both run the same message -> prompt conversion, so they see the same prompt.
"""
from __future__ import annotations

import base64
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from PIL import Image

from .config import Settings

log = logging.getLogger(__name__)


class SamplerError(RuntimeError):
    """A request the model or the server refused; the message says why."""


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]          # OpenAI-style chat messages; images as image_url parts
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str


class Sampler(Protocol):
    def complete(self, requests: list[ChatRequest]) -> list[list[Choice]]:
        """n choices per request, in request order."""

    def describe(self) -> str: ...

    def close(self) -> None: ...


def image_part(data: bytes) -> dict:
    """An OpenAI `image_url` content part carrying the image bytes as a base64 data URL."""
    try:
        kind = (Image.open(io.BytesIO(data)).format or "png").lower()
    except Exception:  # not an image: send it anyway, the server refuses it with a clear message
        kind = None
    mime = f"image/{kind}" if kind else "application/octet-stream"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


class LocalSampler:
    """The model in this process, through the configured backend (no input limits beyond the model's)."""

    def __init__(self, settings: Settings, backend=None):
        from .services.rollout.backend import make_backend  # noqa: PLC0415
        from .services.rollout.chat import InputLimits  # noqa: PLC0415

        self.settings = settings
        self.backend = backend if backend is not None else make_backend(settings)
        self.limits = InputLimits.from_settings(settings)

    def complete(self, requests: list[ChatRequest]) -> list[list[Choice]]:
        from .services.rollout.backend import SamplingParams  # noqa: PLC0415
        from .services.rollout.chat import RequestError, chat_prompt  # noqa: PLC0415

        try:
            prompts = [chat_prompt(r.messages, self.backend.processor, self.limits) for r in requests]
        except RequestError as exc:
            raise SamplerError(exc.message) from None
        params = [SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_tokens,
                                 seed=r.seed, stop=list(r.stop)) for r in requests]
        results = self.backend.generate(prompts, params)
        return [[Choice(c.text, c.finish_reason) for c in result.completions] for result in results]

    def describe(self) -> str:
        return f"local:{self.settings.model.path} ({self.settings.rollout.backend})"

    def close(self) -> None:
        self.backend.close()


class HTTPSampler:
    """A rollout server's /v1/chat/completions; requests go out `concurrency` at a time, and busy
    answers (429/503 with Retry-After) are retried for up to `busy_wait_s`."""

    def __init__(self, url: str, api_key: str | None = None, concurrency: int = 4, timeout_s: float = 600.0,
                 busy_wait_s: float = 600.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self.concurrency = max(1, concurrency)
        self.busy_wait_s = busy_wait_s

    def complete(self, requests: list[ChatRequest]) -> list[list[Choice]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, requests))

    def _one(self, request: ChatRequest) -> list[Choice]:
        body = {"messages": request.messages, "n": request.n, "temperature": request.temperature,
                "top_p": request.top_p, "max_tokens": request.max_tokens, "seed": request.seed}
        if request.stop:
            body["stop"] = list(request.stop)
        deadline = time.monotonic() + self.busy_wait_s
        while True:
            reply = self.client.post("/v1/chat/completions", json=body)
            if reply.status_code in (429, 503) and time.monotonic() < deadline:
                time.sleep(float(reply.headers.get("retry-after", "1")))
                continue
            if reply.status_code != 200:
                raise SamplerError(f"{self.url} answered {reply.status_code}: {error_message(reply)}")
            choices = sorted(reply.json()["choices"], key=lambda c: c["index"])
            return [Choice(c["message"]["content"] or "", c["finish_reason"]) for c in choices]

    def describe(self) -> str:
        return self.url

    def close(self) -> None:
        self.client.close()


def error_message(reply: httpx.Response) -> str:
    try:
        return reply.json()["error"]["message"]
    except Exception:  # not our error format: show the start of the body
        return reply.text[:300]


def open_sampler(settings: Settings, model_dir: str | None = None, url: str | None = None,
                 api_key: str | None = None, concurrency: int = 4) -> Sampler:
    """A local model (`model_dir`, else settings.model.path) or a server at `url`."""
    if url:
        return HTTPSampler(url, api_key=api_key, concurrency=concurrency)
    if model_dir:
        settings = settings.model_copy(deep=True)
        settings.model.path = model_dir
    return LocalSampler(settings)
