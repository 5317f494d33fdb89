"""The interface every generation backend implements (transformers `generate`, vLLM)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PromptInput:
    text: str                 # the chat-formatted prompt
    images: list              # PIL images, in placeholder order


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]      # sampled tokens, the stop token included when one ended the response
    logprobs: list[float]     # behaviour log-probs at the sampling temperature, one per token
    text: str
    finish_reason: str        # "stop" or "length"


@dataclass(frozen=True)
class GroupResult:
    prompt_ids: list[int]
    completions: list[Completion]
    policy_version: int       # every completion of the group was sampled at this version


class Backend(Protocol):
    @property
    def version(self) -> int: ...

    def generate(self, prompts: list[PromptInput], params: SamplingParams) -> list[GroupResult]:
        """Sample params.n completions per prompt; one whole call runs at one policy version."""

    def weight_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor a weight push must carry."""

    def swap_weights(self, state: dict[str, torch.Tensor], version: int) -> bool:
        """Atomically replace the weights between generation batches; False if `version` is not newer."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...
