"""Helpers for the rollout API tests: a real uvicorn server on a free port, real images."""
from __future__ import annotations

import base64
import io
import time
from contextlib import contextmanager

import httpx
from PIL import Image

from mmupt.embedded_redis import free_port
from mmupt.service import Service

TOKEN = "test-token"


@contextmanager
def serving(app):
    """Run `app` on uvicorn in a thread (as the service does) until the block ends; yields its URL."""
    port = free_port()
    service = Service("test-rollout-api", grace_s=5)
    service.serve_http(app, "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        yield url
    finally:
        service._http.should_exit = True
        for thread in service._threads:
            thread.join(5)


def png_bytes(size=(64, 48), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user_message(text: str, *image_urls: str) -> list[dict]:
    content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    return [{"role": "user", "content": content}]
