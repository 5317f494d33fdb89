"""What every service shares: an HTTP app with health and metrics, a stop signal, worker loops.

A service is one process: HTTP (FastAPI on uvicorn) in a thread, its work loops in threads, and the
main thread waiting for SIGTERM/SIGINT. On a signal it stops taking work, lets the loops finish what
they hold, and exits within a bounded time.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import make_asgi_app

from .streams import backoff_sleep

log = logging.getLogger(__name__)


def configure_logging() -> None:
    logging.basicConfig(level=os.environ.get("MMUPT_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def consumer_name(service: str) -> str:
    """Stable per instance (a Kubernetes pod keeps its hostname); pid keeps local processes apart."""
    return os.environ.get("MMUPT_CONSUMER_NAME") or f"{service}-{socket.gethostname()}-{os.getpid()}"


def base_app(title: str, ready: Callable[[], bool], max_request_bytes: int | None = 1024 * 1024) -> FastAPI:
    """Health, readiness and metrics. POST bodies over `max_request_bytes`, or without a length, are
    refused before they are read (None: the app enforces its own limit, as the rollout API does)."""
    app = FastAPI(title=title)

    if max_request_bytes is not None:
        @app.middleware("http")
        async def body_limit(request: Request, call_next):
            if request.method in ("POST", "PUT", "PATCH"):
                length = request.headers.get("content-length")
                if length is None:
                    return JSONResponse({"detail": "a Content-Length header is required"}, status_code=411)
                if not length.isdigit() or int(length) > max_request_bytes:
                    return JSONResponse({"detail": f"request body is {length} bytes, over the limit of "
                                                   f"{max_request_bytes}"}, status_code=413)
            return await call_next(request)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz():
        if ready():
            return {"status": "ready"}
        return JSONResponse({"status": "not ready"}, status_code=503)

    app.mount("/metrics", make_asgi_app())
    return app


class Service:
    """Runs an HTTP app and worker loops until stopped; `stop` is the shared stop signal."""

    def __init__(self, name: str, grace_s: float = 25.0):
        self.name = name
        self.stop = threading.Event()
        self.grace_s = grace_s
        self._threads: list[threading.Thread] = []
        self._http: uvicorn.Server | None = None
        self._http_thread: threading.Thread | None = None
        self.failed: BaseException | None = None

    def serve_http(self, app: FastAPI, host: str, port: int) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
        self._http = uvicorn.Server(config)
        self._http_thread = self._spawn("http", self._http.run)

    def loop(self, name: str, step: Callable[[], None]) -> None:
        """Call `step` until stopped; errors are logged and retried with backoff and jitter."""

        def run():
            errors = 0
            while not self.stop.is_set():
                try:
                    step()
                    errors = 0
                except Exception:  # keep serving: a reconnect or a bad entry must not end the service
                    errors += 1
                    log.exception("%s loop error (attempt %d)", name, errors)
                    backoff_sleep(min(errors, 6))

        self._spawn(name, run)

    def task(self, name: str, job: Callable[[], None]) -> None:
        """Run `job` once; when it returns (or fails) the service stops."""

        def run():
            try:
                job()
            finally:
                self.stop.set()

        self._spawn(name, run)

    def _spawn(self, name: str, target: Callable[[], None]) -> threading.Thread:
        def guarded():
            try:
                target()
            except BaseException as exc:  # a thread that dies takes the service down, loudly
                log.exception("%s thread died", name)
                self.failed = exc
                self.stop.set()

        thread = threading.Thread(target=guarded, name=f"{self.name}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def run_until_stopped(self, on_stop: Callable[[], None] | None = None) -> NoReturn:
        """Wait for a signal (or a task's end), then stop: HTTP takes no new requests, the loops finish
        their current item (unacked work stays pending in Redis for another consumer), then `on_stop`
        closes what they used; the process exits (0, or 1 if a thread died) within `grace_s` of the
        signal, whatever hangs. Never returns."""
        def handle(signum, _frame):
            log.info("%s: signal %d, stopping (grace %.0fs)", self.name, signum, self.grace_s)
            self.stop.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        while not self.stop.wait(0.5):
            pass
        deadline = time.monotonic() + self.grace_s
        # A hung on_stop or library atexit hook (thread pools join their workers) must not outlast the grace.
        watchdog = threading.Timer(self.grace_s + 2.0, self._exit_now, args=(1, "shutdown overran its grace"))
        watchdog.daemon = True
        watchdog.start()
        if self._http is not None:
            self._http.should_exit = True  # take no new requests; those in progress finish
        # Work first, resources after: the loops finish (or hand back) what they hold while the clients,
        # graders and pools they use are still open; only then does on_stop close those.
        workers = [t for t in self._threads if t is not self._http_thread]
        for thread in workers:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if on_stop is not None:
            try:
                on_stop()
            except Exception:
                log.exception("%s: error while stopping", self.name)
        if self._http_thread is not None:
            self._http_thread.join(timeout=max(0.0, deadline - time.monotonic()))
        code = 1 if self.failed is not None else 0
        busy = [t.name for t in self._threads if t.is_alive()]
        if busy:  # their unacked work stays pending in Redis and is reclaimed by another consumer
            self._exit_now(code, f"abandoning {busy} after {self.grace_s:.0f}s")
        log.info("%s stopped", self.name)
        # Exit now: interpreter teardown (thread-pool joins, torch and gRPC finalizers) took seconds
        # more under load and is not bounded by anything; everything durable is done.
        self._exit_now(code, None)

    def _exit_now(self, code: int, why: str | None) -> None:
        if why:
            log.warning("%s: %s; exiting now", self.name, why)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
