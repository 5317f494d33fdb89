"""OpenAI-style chat messages -> a prepared prompt, with every input limit checked.

One path for the HTTP API and for local sampling (`mmupt.sampler.LocalSampler`): messages whose
images are `image_url` parts (base64 data URLs, or absolute paths under the allowed directories)
become the chat template's text plus decoded images, processed once by the model's processor.
Every refusal is a `RequestError` whose status and message go back to the client unchanged.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from mmupt.config import Settings
from mmupt.images import ImageError, ImageTooLarge, decode_image
from mmupt.model import PromptError, render_prompt

from .backend import PromptInput, PromptTooLong, prepare_prompt


class RequestError(Exception):
    """A request the server refuses: HTTP status, a message for the client, optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class InputLimits:
    max_image_bytes: int
    max_image_pixels: int
    max_images: int
    max_prompt_tokens: int
    allowed_dirs: list[str] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings) -> "InputLimits":
        return cls(max_image_bytes=settings.streams.max_image_bytes,
                   max_image_pixels=settings.streams.max_image_pixels,
                   max_images=settings.rollout.max_request_images,
                   max_prompt_tokens=settings.rollout.max_prompt_tokens,
                   allowed_dirs=list(settings.rollout.allowed_local_dirs))


# ---- the OpenAI message schema (what a client sends) ---------------------------------------------
class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


# ---- local files -------------------------------------------------------------------------------
def allowed_path(path: str, allowed_dirs: list[str]) -> Path:
    """The resolved file if it lies inside an allowed directory (symlinks and `..` resolved first)."""
    if not allowed_dirs:
        raise RequestError(403, "this server reads no local files (rollout.allowed_local_dirs is empty); "
                                "send images as base64 data URLs")
    if not Path(path).is_absolute():
        raise RequestError(400, f"local paths must be absolute: {path!r}")
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(Path(d).resolve()) for d in allowed_dirs):
        raise RequestError(403, f"path {path!r} is outside the allowed directories")
    if not resolved.is_file():
        raise RequestError(400, f"no such file: {path!r}")
    return resolved


def read_allowed_file(path: str, allowed_dirs: list[str], max_bytes: int) -> bytes:
    resolved = allowed_path(path, allowed_dirs)
    size = resolved.stat().st_size
    if size > max_bytes:
        raise RequestError(413, f"file {path!r} is {size} bytes, over the limit of {max_bytes}")
    return resolved.read_bytes()


# ---- images ------------------------------------------------------------------------------------
def image_bytes(url: str, limits: InputLimits) -> bytes:
    """The bytes behind an image_url: a base64 data URL, or a local path (plain or file://)."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise RequestError(400, "image data URLs must be base64: data:image/png;base64,...")
        if len(payload) // 4 * 3 > limits.max_image_bytes + 3:  # checked before decoding anything
            raise RequestError(413, f"image is about {len(payload) // 4 * 3} bytes, over the limit of "
                                    f"{limits.max_image_bytes}")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "image data URL is not valid base64") from None
    if url.startswith(("http://", "https://")):
        raise RequestError(400, "remote image URLs are not fetched; send a base64 data URL or an allowed local path")
    path = url[len("file://"):] if url.startswith("file://") else url
    return read_allowed_file(path, limits.allowed_dirs, limits.max_image_bytes)


def load_image(url: str, limits: InputLimits) -> Image.Image:
    try:
        return decode_image(image_bytes(url, limits), limits.max_image_bytes, limits.max_image_pixels)
    except ImageTooLarge as exc:
        raise RequestError(413, str(exc)) from None
    except ImageError as exc:
        raise RequestError(400, str(exc)) from None


# ---- messages ----------------------------------------------------------------------------------
def template_messages(messages: list[ChatMessage]) -> tuple[list[dict], list[str]]:
    """OpenAI messages -> chat-template messages (image parts become vision placeholders) and the
    image URLs in order."""
    out, urls = [], []
    for message in messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        parts = []
        for part in message.content:
            if part.type == "text":
                parts.append({"type": "text", "text": part.text or ""})
            elif part.image_url is None:
                raise RequestError(400, "an image_url part needs an image_url object with a url")
            else:
                parts.append({"type": "image"})
                urls.append(part.image_url.url)
        out.append({"role": message.role, "content": parts})
    return out, urls


def chat_prompt(messages: list[ChatMessage] | list[dict], processor, limits: InputLimits) -> PromptInput:
    """Validate, load images, render the chat template and process once; RequestError on bad input."""
    if not messages:
        raise RequestError(400, "messages must not be empty")
    parsed = [m if isinstance(m, ChatMessage) else ChatMessage.model_validate(m) for m in messages]
    rendered, urls = template_messages(parsed)
    if len(urls) > limits.max_images:
        raise RequestError(400, f"{len(urls)} images, over the limit of {limits.max_images} per request")
    images = [load_image(url, limits) for url in urls]
    return prepared(processor, render_prompt(processor, rendered), images, limits)


# No tokenizer packs more characters than this into one token: a longer text is refused before
# the (costly) tokenization it would otherwise get.
MAX_CHARS_PER_TOKEN = 64


def prepared(processor, text: str, images: list, limits: InputLimits) -> PromptInput:
    if len(text) > limits.max_prompt_tokens * MAX_CHARS_PER_TOKEN:
        raise RequestError(400, f"prompt is {len(text)} characters, far over the limit of "
                                f"{limits.max_prompt_tokens} tokens")
    try:
        return prepare_prompt(processor, text, images, limits.max_prompt_tokens)
    except (PromptTooLong, PromptError) as exc:
        raise RequestError(400, str(exc)) from None


class SamplingRequest(BaseModel):
    """Sampling fields shared by /v1/chat/completions and /v1/rollout (limits checked by the server)."""
    n: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=10)  # 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
