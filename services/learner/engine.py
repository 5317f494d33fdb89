"""The policy under DeepSpeed, a frozen reference model for the KL term, and one GRPO step."""
from __future__ import annotations

import copy
import logging
import os
import time

import torch

from mmupt.config import LearnerSettings, ModelSettings
from mmupt.model import forward_inputs, load_model, resolve_device

from .batch import MicroBatch
from .grpo import LossConfig, entropy_from_logits, grpo_loss, token_logprobs

log = logging.getLogger(__name__)


def init_distributed() -> None:
    """Join (or, run as a single process without a launcher, create) the torch.distributed group."""
    import deepspeed

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        from mmupt.embedded_redis import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def deepspeed_config(cfg: LearnerSettings, micro_batches_per_step: int) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_groups,
        "gradient_accumulation_steps": micro_batches_per_step,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


class PolicyEngine:
    def __init__(self, model_cfg: ModelSettings, cfg: LearnerSettings, temperature: float):
        import deepspeed

        init_distributed()
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.temperature = temperature
        self.device = resolve_device(model_cfg.device)
        model = load_model(model_cfg, self.device)
        model.config.use_cache = False
        self.reference = None
        if cfg.kl_coef > 0:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.micro_per_step = max(1, cfg.batch_groups // cfg.micro_groups)
        # A torch AdamW: an optimizer declared in the DeepSpeed config JIT-compiles fused_adam (minutes).
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=deepspeed_config(cfg, self.micro_per_step))
        self.loss_cfg = LossConfig(clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                                   kl_coef=cfg.kl_coef, kl_clamp=cfg.kl_clamp, tis_cap=cfg.tis_cap)

    @property
    def module(self):
        return self.engine.module

    def _logits(self, model, batch: MicroBatch) -> torch.Tensor:
        dev = self.device
        kwargs = forward_inputs(
            model, batch.input_ids.to(dev), batch.attention_mask.to(dev),
            batch.pixel_values.to(dev) if batch.pixel_values is not None else None,
            batch.image_grid_thw.to(dev) if batch.image_grid_thw is not None else None)
        return model(**kwargs, use_cache=False).logits[:, :-1]

    def micro_step(self, batch: MicroBatch) -> dict[str, float]:
        """Forward and backward one micro-batch; the optimizer steps at the accumulation boundary."""
        mask = batch.mask.to(self.device)
        targets = batch.targets.to(self.device)
        logits = self._logits(self.engine, batch)
        logp = token_logprobs(logits, targets, self.temperature)
        logp_ref = None
        if self.reference is not None:
            with torch.no_grad():
                logp_ref = token_logprobs(self._logits(self.reference, batch), targets, self.temperature)
        loss, metrics = grpo_loss(logp, logp.detach(), batch.behaviour_logp.to(self.device), logp_ref,
                                  batch.advantages.to(self.device), mask, self.loss_cfg)
        self.engine.backward(loss)
        self.engine.step()
        with torch.no_grad():
            selected = logits[mask.bool()]
            metrics["entropy"] = entropy_from_logits(selected, self.temperature).mean().item() if len(selected) else 0.0
        metrics["loss"] = loss.item()
        return metrics

    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        """One optimizer step over exactly `micro_per_step` micro-batches."""
        if len(micro_batches) != self.micro_per_step:
            raise ValueError(f"a step needs {self.micro_per_step} micro-batches, got {len(micro_batches)}")
        started = time.perf_counter()
        totals: dict[str, float] = {}
        for batch in micro_batches:
            for key, value in self.micro_step(batch).items():
                totals[key] = totals.get(key, 0.0) + value / len(micro_batches)
        totals["grad_norm"] = float(self.engine.get_global_grad_norm() or 0.0)
        totals["tokens"] = float(sum(b.n_tokens for b in micro_batches))
        totals["step_seconds"] = time.perf_counter() - started
        return totals

    def export_state(self) -> dict[str, torch.Tensor]:
        """Full weights for a push or checkpoint (ZeRO-3 gathering lives with the learner issue)."""
        return {name: t.detach() for name, t in self.engine.module.state_dict().items()}

    def save_hf(self, path, processor) -> None:
        self.engine.module.save_pretrained(path, state_dict=self.export_state())
        processor.save_pretrained(path)
