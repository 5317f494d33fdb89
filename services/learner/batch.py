"""Scored groups -> padded tensors for one forward/backward pass."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmupt.images import ImageStore, decode_image
from mmupt.model import build_messages, encode_prompt, render_prompt
from mmupt.config import Settings
from mmupt.wire import ScoredMsg, unpack_floats, unpack_ids

from .grpo import group_advantages


class BatchError(ValueError):
    """A scored group that cannot be trained on (e.g. its images expired)."""


@dataclass
class MicroBatch:
    input_ids: torch.Tensor          # [N, L] right-padded
    attention_mask: torch.Tensor     # [N, L]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    targets: torch.Tensor            # [N, L-1] next tokens
    mask: torch.Tensor               # [N, L-1] 1.0 where the next token is a response token
    behaviour_logp: torch.Tensor     # [N, L-1] behaviour log-probs at response positions, else 0
    advantages: torch.Tensor         # [N]
    rewards: torch.Tensor            # [N]
    n_groups: int

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum().item())


@dataclass
class EncodedPrompt:
    ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


class BatchBuilder:
    def __init__(self, settings: Settings, processor, images: ImageStore):
        self.cfg = settings
        self.processor = processor
        self.images = images
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.reencoded = 0  # prompts where the rollout's token ids disagreed with ours

    def encode(self, scored: ScoredMsg) -> EncodedPrompt:
        g, s = scored.group, self.cfg.streams
        try:
            images = [decode_image(self.images.get(h), s.max_image_bytes, s.max_image_pixels) for h in g.image_hashes]
        except KeyError as exc:
            raise BatchError(str(exc)) from None
        text = render_prompt(self.processor, build_messages(g.problem, len(images), self.cfg.prompt))
        enc = encode_prompt(self.processor, text, images)
        ours = enc["input_ids"][0].tolist()
        theirs = unpack_ids(g.prompt_ids).tolist()
        # Train on exactly the context that was sampled from, when it is consistent with our images.
        ids = theirs if theirs.count(self.image_token_id) == ours.count(self.image_token_id) else ours
        if ids is ours and theirs != ours:
            self.reencoded += 1
        return EncodedPrompt(ids=ids, pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"))

    def build(self, groups: list[tuple[ScoredMsg, EncodedPrompt]], pad_id: int) -> MicroBatch:
        rows, pixel_values, grids, advantages, rewards = [], [], [], [], []
        for scored, prompt in groups:
            group_rewards = torch.tensor(scored.vote.rewards, dtype=torch.float32)
            advantages.append(group_advantages(group_rewards))
            rewards.append(group_rewards)
            for response in scored.group.responses:
                rows.append((prompt.ids, unpack_ids(response.token_ids).tolist(),
                             unpack_floats(response.logprobs).tolist()))
                if prompt.pixel_values is not None:
                    pixel_values.append(prompt.pixel_values)
                    grids.append(prompt.image_grid_thw)
        length = max(len(p) + len(r) for p, r, _ in rows)
        n = len(rows)
        input_ids = torch.full((n, length), pad_id, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        mask = torch.zeros((n, length - 1))
        behaviour = torch.zeros((n, length - 1))
        for i, (p, r, lp) in enumerate(rows):
            input_ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            attention[i, :len(p) + len(r)] = 1
            # Position t predicts token t+1: response tokens are predicted from len(p)-1 onwards.
            mask[i, len(p) - 1:len(p) - 1 + len(r)] = 1.0
            behaviour[i, len(p) - 1:len(p) - 1 + len(r)] = torch.tensor(lp)
        return MicroBatch(
            input_ids=input_ids, attention_mask=attention,
            pixel_values=torch.cat(pixel_values) if pixel_values else None,
            image_grid_thw=torch.cat(grids) if grids else None,
            targets=input_ids[:, 1:], mask=mask, behaviour_logp=behaviour,
            advantages=torch.cat(advantages), rewards=torch.cat(rewards), n_groups=len(groups),
        )
