"""Images: content-addressed in Redis (messages carry the sha256, not the pixels), decoded safely.

Decoding refuses non-images, images over a byte limit and over a pixel limit (decompression bombs)
with `ImageError`, whose message says why.
"""
from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image

from .streams import RunKeys


class ImageError(ValueError):
    """An image that cannot be used; the message is safe to show to a client."""


class ImageTooLarge(ImageError):
    """An image over the byte or pixel limit (HTTP answers 413 rather than 400)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Bytes -> RGB image, checking size limits *before* decompressing pixel data."""
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size  # read from the header; no pixels decoded yet
            if width * height > max_pixels:
                raise ImageTooLarge(f"image is {width}x{height} pixels, over the limit of {max_pixels}")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # PIL raises many types for broken input
        raise ImageError(f"not a readable image: {type(exc).__name__}") from None
    return img.convert("RGB")


class ImageStore:
    """`image:{sha256}` strings with a TTL that every read refreshes."""

    def __init__(self, client, keys: RunKeys, ttl_s: int):
        self.r, self.keys, self.ttl_s = client, keys, ttl_s

    def put(self, data: bytes) -> str:
        digest = sha256_hex(data)
        key = self.keys.image(digest)
        if not self.r.set(key, data, ex=self.ttl_s, nx=True):
            self.r.expire(key, self.ttl_s)
        return digest

    def get(self, digest: str) -> bytes:
        data = self.r.getex(self.keys.image(digest), ex=self.ttl_s)
        if data is None:
            raise KeyError(f"image {digest} is not in the store (expired or never stored)")
        if sha256_hex(data) != digest:
            raise ImageError(f"image {digest} does not match its hash")
        return data
