"""Scored groups -> padded tensors for one forward/backward pass, and each rank's share of a batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmupt.config import Settings
from mmupt.images import ImageError, decode_image
from mmupt.model import PromptError, build_messages, encode_prompt, render_prompt
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
    # Only positions from `first` on predict response tokens, so the model is asked for the logits
    # of the last `logits_to_keep` = L - first positions (the prompt's, often long with images, are
    # never materialised). The per-token tensors below cover positions first .. L-2.
    first: int
    targets: torch.Tensor            # [N, L-1-first] next tokens
    mask: torch.Tensor               # [N, L-1-first] 1.0 where the next token is a response token
    behaviour_logp: torch.Tensor     # [N, L-1-first] behaviour log-probs at response positions, else 0
    advantages: torch.Tensor         # [N]
    rewards: torch.Tensor            # [N]
    n_groups: int

    @property
    def logits_to_keep(self) -> int:
        return self.input_ids.shape[1] - self.first

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum().item())


@dataclass
class EncodedPrompt:
    ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


def rank_share(items: list, per_micro: int, rank: int, world: int) -> list[list]:
    """Cut one update's groups into micro-batches of `per_micro`; rank r takes micro-batches r, r+world, ...

    Every micro-batch is the same on one rank or several, so data parallelism changes who computes
    a micro-batch's gradient, never the gradient (DeepSpeed averages over ranks and accumulation).
    """
    micro = [items[i:i + per_micro] for i in range(0, len(items), per_micro)]
    return micro[rank::world]


class BatchBuilder:
    def __init__(self, settings: Settings, processor):
        self.cfg = settings
        self.processor = processor
        self.pad_id = processor.tokenizer.pad_token_id
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.reencoded = 0  # prompts where the rollout's token ids disagreed with ours

    def encode(self, scored: ScoredMsg, image_bytes: list[bytes]) -> EncodedPrompt:
        """The prompt as the policy sees it; `image_bytes` in the group's image_hashes order."""
        g, s = scored.group, self.cfg.streams
        try:
            images = [decode_image(data, s.max_image_bytes, s.max_image_pixels) for data in image_bytes]
            text = render_prompt(self.processor, build_messages(g.problem, len(images), self.cfg.prompt))
        except (ImageError, PromptError) as exc:
            raise BatchError(f"{type(exc).__name__}: {exc}") from None
        enc = encode_prompt(self.processor, text, images)
        ours = enc["input_ids"][0].tolist()
        theirs = unpack_ids(g.prompt_ids).tolist()
        # Train on exactly the context that was sampled from, when it is consistent with our images.
        ids = theirs if theirs.count(self.image_token_id) == ours.count(self.image_token_id) else ours
        if ids is ours and theirs != ours:
            self.reencoded += 1
        return EncodedPrompt(ids=ids, pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"))

    def build(self, groups: list[tuple[ScoredMsg, EncodedPrompt]]) -> MicroBatch:
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
        # Position t predicts token t+1: response tokens are predicted from len(p)-1 onwards.
        first = min(len(p) for p, _, _ in rows) - 1
        n = len(rows)
        input_ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        mask = torch.zeros((n, length - 1 - first))
        behaviour = torch.zeros((n, length - 1 - first))
        for i, (p, r, lp) in enumerate(rows):
            input_ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            attention[i, :len(p) + len(r)] = 1
            start = len(p) - 1 - first
            mask[i, start:start + len(r)] = 1.0
            behaviour[i, start:start + len(r)] = torch.tensor(lp)
        return MicroBatch(
            input_ids=input_ids, attention_mask=attention,
            pixel_values=torch.cat(pixel_values) if pixel_values else None,
            image_grid_thw=torch.cat(grids) if grids else None,
            first=first, targets=input_ids[:, first + 1:], mask=mask, behaviour_logp=behaviour,
            advantages=torch.cat(advantages), rewards=torch.cat(rewards), n_groups=len(groups),
        )
