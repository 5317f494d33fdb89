"""Transformers `generate` backend (CPU and GPU)."""
from __future__ import annotations

import threading

import torch

from mmupt.config import ModelSettings
from mmupt.model import banned_token_ids, encode_prompt, load_model, load_processor, stop_token_ids

from .backend import Completion, GroupResult, PromptInput, SamplingParams, cut_at_stop, params_per_prompt


class TransformersBackend:
    concurrent_batches = 1  # generate() holds the model lock: batches run one after another

    def __init__(self, settings: ModelSettings, version: int = 0):
        self.processor = load_processor(settings)
        self.tokenizer = self.processor.tokenizer
        self.model = load_model(settings).eval()
        self.device = next(self.model.parameters()).device
        self.stop_ids = stop_token_ids(self.tokenizer)
        # Vision and control tokens are never sampled (a sampled <|image_pad|> breaks the learner).
        self.banned = [[i] for i in banned_token_ids(self.tokenizer)]
        # One lock serialises generation and weight swaps: no request sees a half-loaded model.
        self._lock = threading.Lock()
        self._version = version

    @property
    def version(self) -> int:
        return self._version

    def generate(self, prompts: list[PromptInput],
                 params: SamplingParams | list[SamplingParams]) -> list[GroupResult]:
        per_prompt = params_per_prompt(params, len(prompts))
        with self._lock:
            return [self._generate_one(p, sp) for p, sp in zip(prompts, per_prompt)]

    @torch.no_grad()
    def _generate_one(self, prompt: PromptInput, params: SamplingParams) -> GroupResult:
        encoded = prompt.encoded or encode_prompt(self.processor, prompt.text, prompt.images)
        inputs = {k: v.to(self.device) for k, v in encoded.items()}
        prompt_len = inputs["input_ids"].shape[1]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        greedy = params.temperature == 0
        # Temperature 0 is greedy decoding: every one of the n answers would be the same, so decode once.
        out = self.model.generate(
            **inputs, do_sample=not greedy, temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p, top_k=None if greedy else 0,
            max_new_tokens=params.max_new_tokens, num_return_sequences=1 if greedy else params.n,
            eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
            bad_words_ids=self.banned or None, output_logits=True, return_dict_in_generate=True,
            stop_strings=params.stop or None, tokenizer=self.tokenizer if params.stop else None,
        )
        new_tokens = out.sequences[:, prompt_len:]
        # Raw logits -> log-probs at the sampling temperature (what the learner recomputes); greedy
        # answers report the model's own (temperature 1) log-probs.
        logits = torch.stack(out.logits, dim=1).float() / (params.temperature or 1.0)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        if greedy:
            new_tokens, logprobs = new_tokens.expand(params.n, -1), logprobs.expand(params.n, -1)
        completions = [self._completion(new_tokens[i], logprobs[i], params) for i in range(params.n)]
        return GroupResult(prompt_ids=inputs["input_ids"][0].tolist(), completions=completions,
                           policy_version=self._version)

    def _completion(self, tokens: torch.Tensor, logprobs: torch.Tensor, params: SamplingParams) -> Completion:
        ids = tokens.tolist()
        end, reason = len(ids), "length"
        for i, tok in enumerate(ids):
            if tok in self.stop_ids:
                end, reason = i + 1, "stop"  # keep the stop token: the policy learns to stop
                break
        if params.stop:
            # A stop string ends the sequence at the token that completes it; generate pads the rest.
            stop_end = self._stop_string_end(ids[:end], params.stop)
            if stop_end is not None:
                end, reason = stop_end, "stop"
        text, _ = cut_at_stop(self.tokenizer.decode(ids[:end], skip_special_tokens=True), params.stop)
        return Completion(token_ids=ids[:end], logprobs=logprobs[:end].tolist(), text=text, finish_reason=reason)

    def _stop_string_end(self, ids: list[int], stop: list[str]) -> int | None:
        """Fewest tokens whose text contains a stop string (binary search: containment only grows)."""
        def contains(end: int) -> bool:
            return cut_at_stop(self.tokenizer.decode(ids[:end], skip_special_tokens=True), stop)[1]

        if not contains(len(ids)):
            return None
        low, high = 1, len(ids)
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if contains(mid) else (mid + 1, high)
        return low

    def weight_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {name: (tuple(t.shape), t.dtype) for name, t in self.model.state_dict().items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def swap_weights(self, state: dict[str, torch.Tensor], version: int) -> bool:
        with self._lock:
            if version <= self._version:
                return False
            # Names and shapes were verified against weight_specs() before staging, so this
            # copy cannot fail half-way; load_state_dict casts to the model's dtype.
            self.model.load_state_dict(state, strict=True)
            self._version = version
            return True

    def close(self) -> None:
        """Nothing to release: the model lives in this process."""
