"""The interface every generation backend implements (transformers `generate`, vLLM).

A prompt is prepared once (`prepare_prompt`: chat text + images -> processor outputs), so its length
is known before it is queued and the transformers backend does not process its images twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mmupt.model import encode_prompt


class PromptTooLong(ValueError):
    """A prompt (image tokens included) over the configured maximum; the message says by how much."""


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0      # 0: greedy decoding
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PromptInput:
    text: str                 # the chat-formatted prompt
    images: list              # PIL images, in placeholder order
    # Processor outputs (input_ids with image tokens expanded, pixel_values, ...) when already
    # computed by prepare_prompt; backends that need them compute them otherwise.
    encoded: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int | None:
        return None if self.encoded is None else int(self.encoded["input_ids"].shape[1])


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]      # sampled tokens, the stop token included when one ended the response
    logprobs: list[float]     # behaviour log-probs at the sampling temperature, one per token
    text: str                 # decoded without special tokens, cut before a matched stop string
    finish_reason: str        # "stop" or "length"


@dataclass(frozen=True)
class GroupResult:
    prompt_ids: list[int]
    completions: list[Completion]
    policy_version: int       # every completion of the group was sampled at this version


def prepare_prompt(processor, text: str, images: list, max_prompt_tokens: int) -> PromptInput:
    """Run the processor once (Qwen smart resize within min/max pixels, as the learner does) and
    refuse a prompt whose tokens, image tokens included, exceed `max_prompt_tokens`."""
    encoded = encode_prompt(processor, text, images)
    prompt = PromptInput(text=text, images=images, encoded=encoded)
    if prompt.num_tokens > max_prompt_tokens:
        raise PromptTooLong(f"prompt is {prompt.num_tokens} tokens (image tokens included), "
                            f"over the limit of {max_prompt_tokens}")
    return prompt


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (OpenAI semantics: the stop string is not returned)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class Backend(Protocol):
    processor: Any            # the Hugging Face processor (chat template, image processing)
    # Batches the server may hand over at once: 1 for transformers (one call at a time), more for
    # vLLM, whose engine batches continuously across calls.
    concurrent_batches: int

    @property
    def version(self) -> int: ...

    def generate(self, prompts: list[PromptInput],
                 params: SamplingParams | list[SamplingParams]) -> list[GroupResult]:
        """Sample n completions per prompt (one params for all, or one per prompt); every group of
        the call is sampled at one policy version."""

    def weight_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor a weight push must carry."""

    def swap_weights(self, state: dict[str, torch.Tensor], version: int) -> bool:
        """Atomically replace the weights between generation batches; False if `version` is not newer."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def close(self) -> None: ...


def params_per_prompt(params: SamplingParams | list[SamplingParams], count: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"{len(params)} sampling params for {count} prompts")
    return list(params)


def make_backend(settings):
    """The configured backend (`rollout.backend`), loaded and ready to generate. vLLM is imported
    only here, so that CPU installs never need it."""
    if settings.rollout.backend == "vllm":
        from .vllm_backend import VLLMBackend  # noqa: PLC0415 (GPU images only)

        return VLLMBackend(settings)
    from .hf_backend import TransformersBackend  # noqa: PLC0415

    return TransformersBackend(settings.model)
