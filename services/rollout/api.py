"""The rollout server's HTTP API (FastAPI).

- `POST /v1/chat/completions`: OpenAI-compatible (images as `image_url` data URLs or allowed local
  paths, `n` samples, `logprobs`); the response also carries `majority_answer`, `vote_share` and the
  `policy_version` that sampled it.
- `POST /v1/rollout`: one MM-UPT problem (with `<image>` placeholders), the paper's prompt, a voted group
  with token ids and behaviour log-probs.
- `POST /v1/eval` (bearer token) starts an evaluation job on a benchmark file under the allowed
  directories; `GET /v1/eval/{id}` reports its progress and result.
- `GET /v1/version`, `/healthz`, `/readyz` (ready once weights are loaded), `/metrics`.

Every refusal is a 4xx with an OpenAI-style error body `{"error": {"message", "type", "code"}}`;
a full queue answers 429 and a server that is loading or overloaded answers 503, both with Retry-After.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from mmupt.auth import bearer_ok
from mmupt.config import Settings
from mmupt.eval import BenchmarkError, EvalConfig, EvalItem, evaluate, load_benchmark
from mmupt.model import build_messages, render_prompt
from mmupt.sampler import ChatRequest, Choice
from mmupt.service import base_app

from . import metrics
from .backend import GroupResult, SamplingParams
from .chat import (ChatMessage, InputLimits, RequestError, SamplingRequest, allowed_path, chat_prompt, load_image,
                   prepared)
from .request_queue import GenerationQueue, QueueFull, QueueTimeout

log = logging.getLogger(__name__)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 411: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 503: "overloaded_error"}
KEEP_EVAL_JOBS = 16


# ---- request bodies -----------------------------------------------------------------------------
class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=0)  # only the sampled token's log-prob exists
    stream: bool = Field(False, description="streaming is not supported")
    user: str | None = None
    # mmupt extension: multiple-choice options, so that `B` and the text of option B vote together.
    options: list[str] = []


class RolloutRequest(SamplingRequest):
    model_config = ConfigDict(extra="forbid")
    problem: str                         # MM-UPT problem text with one <image> placeholder per image
    images: list[str] = []               # data URLs or allowed local paths
    options: list[str] = []
    hidden_answer: str | None = None     # monitoring only: reported as label_correct, never a reward


class EvalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    benchmark: str                       # absolute path under rollout.allowed_local_dirs
    k: int = Field(8, ge=1)
    temperature: float = Field(0.2, ge=0, le=10)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    limit: int | None = Field(None, ge=1)
    seed: int | None = 0


# ---- evaluation jobs ----------------------------------------------------------------------------
@dataclass
class EvalJob:
    id: str
    benchmark: str
    total: int
    status: str = "running"              # running | finished | failed
    done: int = 0
    result: dict | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)

    def view(self) -> dict:
        return {"id": self.id, "object": "eval.job", "benchmark": self.benchmark, "status": self.status,
                "done": self.done, "total": self.total, "created": int(self.created), "error": self.error,
                "result": self.result}


class QueueSampler:
    """The mmupt.sampler interface over this server's own queue (server-side evaluation)."""

    def __init__(self, server: "RolloutServer"):
        self.server = server

    def complete(self, requests: list[ChatRequest]) -> list[list[Choice]]:
        futures = []
        for r in requests:
            prompt = chat_prompt(r.messages, self.server.backend.processor, self.server.limits)
            params = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_tokens,
                                    seed=r.seed, stop=list(r.stop))
            futures.append(self._submit(prompt, params))
        return [[Choice(c.text, c.finish_reason) for c in f.result().completions] for f in futures]

    def _submit(self, prompt, params):
        while True:  # share the queue with live traffic: wait for room rather than fail the job
            try:
                return self.server.queue.submit(prompt, params)
            except QueueFull:
                time.sleep(self.server.settings.rollout.retry_after_s)

    def describe(self) -> str:
        return f"server:{self.server.model_name}"

    def close(self) -> None:
        pass


# ---- the server state ---------------------------------------------------------------------------
class RolloutServer:
    """What the API works with: the backend once loaded, the request queue, the grader, eval jobs."""

    def __init__(self, settings: Settings, token: str | None):
        self.settings = settings
        self.token = token
        self.limits = InputLimits.from_settings(settings)
        self.model_name = Path(settings.model.path).name
        self.backend = None
        self.queue: GenerationQueue | None = None
        self._grader = None
        self._grader_lock = threading.Lock()
        self.jobs: OrderedDict[str, EvalJob] = OrderedDict()
        self._jobs_lock = threading.Lock()

    def attach(self, backend) -> None:
        """Serve `backend` from now on (/readyz turns ready)."""
        r = self.settings.rollout
        self.queue = GenerationQueue(backend, r.max_queue, r.max_batch_prompts, r.queue_timeout_s).start()
        self.backend = backend
        metrics.VERSION.set(backend.version)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.stop()

    def ready(self) -> bool:
        return self.backend is not None

    def require_ready(self) -> None:
        if self.backend is None:
            raise RequestError(503, "the model is still loading", self.retry_after())

    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.rollout.retry_after_s)}

    def grader(self):
        with self._grader_lock:  # built on first use: graders may be costly to set up
            if self._grader is None:
                from mmupt.services.voter.grading import make_grader  # noqa: PLC0415

                self._grader = make_grader(self.settings.voter.grader)
            return self._grader

    def vote(self, texts: list[str], options: list[str], hidden_answer: str | None = None):
        from mmupt.services.voter.vote import vote  # noqa: PLC0415

        return vote(texts, self.grader(), "majority", hidden_answer, options or None)

    def sampling(self, body: SamplingRequest, default_n: int, max_tokens: int | None) -> SamplingParams:
        """Request fields + configured defaults, refused with 400 over the configured maxima."""
        r = self.settings.rollout
        n = body.n or default_n
        new_tokens = max_tokens or r.max_new_tokens
        if n > r.max_request_n:
            raise RequestError(400, f"n={n} is over the limit of {r.max_request_n} (rollout.max_request_n)")
        if new_tokens > r.max_request_new_tokens:
            raise RequestError(400, f"max_tokens={new_tokens} is over the limit of {r.max_request_new_tokens} "
                                    "(rollout.max_request_new_tokens)")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 8 or any(not s for s in stop):
            raise RequestError(400, "stop takes at most 8 non-empty strings")
        return SamplingParams(n=n, temperature=r.temperature if body.temperature is None else body.temperature, top_p=body.top_p or r.top_p,
                              max_new_tokens=new_tokens, seed=body.seed, stop=stop)

    async def generate(self, prompt, params: SamplingParams) -> GroupResult:
        try:
            future = self.queue.submit(prompt, params)
        except QueueFull as exc:
            raise RequestError(429, f"{exc}; retry later", self.retry_after()) from None
        try:
            return await asyncio.wrap_future(future)
        except QueueTimeout as exc:
            raise RequestError(503, f"the server is overloaded: {exc}", self.retry_after()) from None
        except Exception as exc:  # the backend failed: say so in the API's error format
            raise RequestError(500, f"generation failed: {type(exc).__name__}: {exc}") from None

    def chat_vote(self, texts: list[str], options: list[str]):
        """The vote over a chat completion's choices, or (None, reason): the completion is still valid
        when the grader cannot run, so it is answered with the reason rather than refused."""
        try:
            return self.vote(texts, options), None
        except Exception as exc:
            log.warning("vote failed: %s", exc)
            return None, f"{type(exc).__name__}: {exc}"

    # ---- evaluation jobs ----
    def start_eval(self, body: EvalRequest, items: list[EvalItem]) -> EvalJob:
        with self._jobs_lock:
            running = [j for j in self.jobs.values() if j.status == "running"]
            if running:
                raise RequestError(429, f"evaluation {running[0].id} is still running; one runs at a time",
                                   self.retry_after())
            job = EvalJob(id=f"eval-{uuid.uuid4().hex[:12]}", benchmark=body.benchmark, total=len(items))
            self.jobs[job.id] = job
            while len(self.jobs) > KEEP_EVAL_JOBS:
                self.jobs.popitem(last=False)
        cfg = EvalConfig(k=body.k, temperature=body.temperature, top_p=body.top_p,
                         max_tokens=body.max_tokens or self.settings.rollout.max_new_tokens, seed=body.seed,
                         batch_size=self.settings.rollout.max_batch_prompts)
        threading.Thread(target=self._run_eval, args=(job, items, cfg), name=job.id, daemon=True).start()
        return job

    def _run_eval(self, job: EvalJob, items: list[EvalItem], cfg: EvalConfig) -> None:
        def progress(done: int, total: int) -> None:
            job.done = done

        try:
            job.result = evaluate(items, QueueSampler(self), cfg, self.grader(), self.settings.prompt,
                                  on_progress=progress, show_bar=False)
            job.result["policy_version"] = self.backend.version
            job.status = "finished"
            metrics.EVAL_JOBS.labels("finished").inc()
        except Exception as exc:  # a job fails alone: the server keeps serving
            log.exception("evaluation %s failed", job.id)
            job.error, job.status = f"{type(exc).__name__}: {exc}", "failed"
            metrics.EVAL_JOBS.labels("failed").inc()


# ---- responses ----------------------------------------------------------------------------------
def chat_response(result: GroupResult, model: str, vote, tokenizer, with_logprobs: bool) -> dict:
    choices = []
    for index, c in enumerate(result.completions):
        logprobs = None
        if with_logprobs:
            tokens = [tokenizer.decode([t]) for t in c.token_ids]
            logprobs = {"content": [{"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": []}
                                    for tok, lp in zip(tokens, c.logprobs)]}
        choices.append({"index": index, "message": {"role": "assistant", "content": c.text},
                        "finish_reason": c.finish_reason, "logprobs": logprobs})
    completion_tokens = sum(len(c.token_ids) for c in result.completions)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model, "system_fingerprint": f"mmupt-policy-v{result.policy_version}", "choices": choices,
        "usage": {"prompt_tokens": len(result.prompt_ids), "completion_tokens": completion_tokens,
                  "total_tokens": len(result.prompt_ids) + completion_tokens},
        "policy_version": result.policy_version, "majority_answer": vote.pseudo_label if vote else None,
        "vote_share": vote.majority_ratio if vote else None, "answers": vote.answers if vote else None,
    }


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


# ---- the app ------------------------------------------------------------------------------------
def build_app(server: RolloutServer, version_info: Callable[[], dict] | None = None) -> FastAPI:
    app = base_app("mmupt rollout", ready=server.ready, max_request_bytes=None)  # limit below, in the API's format
    max_body = server.settings.rollout.max_request_bytes

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, exc: RequestError):
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return error_response(400, f"{where}: {first['msg']}" if where else first["msg"])

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        if request.method == "POST":  # refuse oversized bodies before reading them
            length = request.headers.get("content-length")
            if length is None:
                return error_response(411, "a Content-Length header is required")
            if not length.isdigit() or int(length) > max_body:
                return error_response(413, f"request body is {length} bytes, over the limit of {max_body}")
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        if request.url.path.startswith("/v1/") and route is not None:
            metrics.REQUESTS.labels(route.path, str(response.status_code)).inc()
            metrics.REQUEST_SECONDS.labels(route.path).observe(time.perf_counter() - started)
        return response

    @app.get("/v1/version")
    def version():
        info = {"version": server.backend.version if server.backend else None, "model": server.model_name,
                "backend": server.settings.rollout.backend, "ready": server.ready()}
        return info | (version_info() if version_info and server.ready() else {})

    @app.get("/v1/models")
    def models():  # what OpenAI clients list; one model per server
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "owned_by": "mmupt"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        server.require_ready()
        if body.stream:
            raise RequestError(400, "stream=true is not supported; ask for the whole completion")
        params = server.sampling(body, 1, body.max_completion_tokens or body.max_tokens)
        prompt = await run_in_threadpool(chat_prompt, body.messages, server.backend.processor, server.limits)
        result = await server.generate(prompt, params)
        vote, vote_error = await run_in_threadpool(server.chat_vote, [c.text for c in result.completions],
                                                   body.options)
        return chat_response(result, body.model or server.model_name, vote, server.backend.processor.tokenizer,
                             body.logprobs) | ({"vote_error": vote_error} if vote_error else {})

    @app.post("/v1/rollout")
    async def rollout(body: RolloutRequest):
        server.require_ready()
        params = server.sampling(body, server.settings.rollout.group_size, body.max_tokens)
        if len(body.images) > server.limits.max_images:
            raise RequestError(400, f"{len(body.images)} images, over the limit of {server.limits.max_images}")

        def prepare():
            images = [load_image(url, server.limits) for url in body.images]
            messages = build_messages(body.problem, len(images), server.settings.prompt)
            return prepared(server.backend.processor, render_prompt(server.backend.processor, messages), images,
                            server.limits)

        try:
            prompt = await run_in_threadpool(prepare)
        except ValueError as exc:  # placeholders that do not match the images
            raise RequestError(400, str(exc)) from None
        result = await server.generate(prompt, params)
        try:
            vote = await run_in_threadpool(server.vote, [c.text for c in result.completions], body.options,
                                           body.hidden_answer)
        except Exception as exc:  # a rollout is its vote: without one there is nothing to answer
            raise RequestError(500, f"vote failed: {type(exc).__name__}: {exc}") from None
        return {"policy_version": result.policy_version, "prompt_tokens": len(result.prompt_ids),
                "sampling": {"n": params.n, "temperature": params.temperature, "top_p": params.top_p,
                             "max_tokens": params.max_new_tokens, "seed": params.seed},
                "responses": [{"text": c.text, "finish_reason": c.finish_reason, "token_ids": c.token_ids,
                               "logprobs": c.logprobs} for c in result.completions],
                "vote": vote.model_dump()}

    @app.post("/v1/eval", status_code=202)
    async def start_eval(body: EvalRequest, request: Request):
        if not server.token or not bearer_ok(request.headers.get("authorization"), server.token):
            raise RequestError(401, "POST /v1/eval needs the server's bearer token")
        server.require_ready()
        r = server.settings.rollout
        if body.k > r.max_request_n:
            raise RequestError(400, f"k={body.k} is over the limit of {r.max_request_n} (rollout.max_request_n)")
        if (body.max_tokens or 0) > r.max_request_new_tokens:
            raise RequestError(400, f"max_tokens={body.max_tokens} is over the limit of {r.max_request_new_tokens}")

        def guard(path: Path) -> None:
            allowed_path(str(path), server.limits.allowed_dirs)

        try:
            items = await run_in_threadpool(load_benchmark, body.benchmark, body.limit, guard)
        except BenchmarkError as exc:
            raise RequestError(400, str(exc)) from None
        return server.start_eval(body, items).view()

    @app.get("/v1/eval/{job_id}")
    def eval_status(job_id: str):
        job = server.jobs.get(job_id)
        if job is None:
            raise RequestError(404, f"no evaluation job {job_id!r} (finished jobs are kept: the last "
                                    f"{KEEP_EVAL_JOBS})")
        return job.view()

    return app
