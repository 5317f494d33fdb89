"""The policy under DeepSpeed, a frozen reference model for the KL term, and GRPO updates.

Every rank builds one PolicyEngine. Whatever runs collectives (a forward or backward under ZeRO-3,
an optimizer step, `export_state`, saving and loading) must be called by every rank in the same
order; `ranks.Lockstep` keeps them in step.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mmupt.config import ConfigError, LearnerSettings, ModelSettings
from mmupt.model import forward_inputs, load_model, resolve_device

from .batch import MicroBatch
from .grpo import LossConfig, entropy_from_logits, grpo_loss, token_logprobs

log = logging.getLogger(__name__)
ENGINE_TAG = "engine"  # DeepSpeed's tag (sub-folder) for the optimizer and engine state of a checkpoint
SUMMED_STATS = {"tokens"}  # statistics summed over ranks; the rest are averaged


def init_distributed() -> None:
    """Join (or, run as a single process without a launcher, create) the torch.distributed group."""
    import deepspeed

    import torch.distributed as dist

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if os.environ["WORLD_SIZE"] == "1" and "MASTER_PORT" not in os.environ and not dist.is_initialized():
        # A lone learner needs no rendezvous: an in-memory store avoids a TCP port that another socket
        # could take between choosing it and binding it (seen as EADDRINUSE under load).
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend)


def deepspeed_config(cfg: LearnerSettings, micro_per_step: int) -> dict:
    zero: dict = {"stage": cfg.zero_stage}
    pin = torch.cuda.is_available()
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_groups,
        "gradient_accumulation_steps": micro_per_step,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


def reference_config(cfg: LearnerSettings, micro_per_step: int) -> dict:
    """ZeRO-3 for the frozen reference too, so that it is sharded like the policy (no optimizer)."""
    ds = deepspeed_config(cfg, micro_per_step)
    ds["zero_optimization"] = {k: v for k, v in ds["zero_optimization"].items() if k != "offload_optimizer"}
    ds.pop("gradient_clipping")
    return ds


def vision_tower(model) -> torch.nn.Module:
    for owner in (model, getattr(model, "model", None)):
        tower = getattr(owner, "visual", None)
        if isinstance(tower, torch.nn.Module):
            return tower
    raise ConfigError("learner.freeze_vision: the model has no vision tower (`visual`) to freeze")


def make_optimizer(params, cfg: LearnerSettings) -> torch.optim.Optimizer:
    if cfg.offload_optimizer:
        # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's CPU Adam (compiled on first use)
        # is several times faster there than torch's.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, adamw_mode=True)
    # A torch AdamW: an optimizer declared in the DeepSpeed config JIT-compiles fused_adam (minutes).
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class PolicyEngine:
    def __init__(self, model_cfg: ModelSettings, cfg: LearnerSettings, temperature: float):
        import deepspeed

        init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        per_rank = cfg.micro_groups * self.world
        if cfg.batch_groups % per_rank:
            raise ConfigError(f"learner.batch_groups ({cfg.batch_groups}) must be a multiple of micro_groups x "
                              f"ranks ({cfg.micro_groups} x {self.world})")
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.temperature = temperature
        self.device = resolve_device(model_cfg.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        model = load_model(model_cfg, self.device)
        model.config.use_cache = False
        if cfg.freeze_vision:
            vision_tower(model).requires_grad_(False)
        self.zero3 = cfg.zero_stage == 3
        # Micro-batches each rank runs per optimizer step (DeepSpeed's gradient accumulation).
        self.micro_per_step = cfg.batch_groups // per_rank
        # The reference is the initial model, also after a resume: copy it before DeepSpeed partitions it.
        reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               config=deepspeed_config(cfg, self.micro_per_step))
        self.reference = self._wrap_reference(reference) if reference is not None else None
        # DeepSpeed records the (pre-clip) gradient norm in its ZeRO and bf16 optimizers, but not for
        # plain fp32 without ZeRO, where it clips with torch: measure it there ourselves.
        self._measure_grad_norm = cfg.zero_stage == 0 and cfg.precision == "fp32"
        self._grad_norm = 0.0
        self.loss_cfg = LossConfig(clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                                   kl_coef=cfg.kl_coef, kl_clamp=cfg.kl_clamp, tis_cap=cfg.tis_cap,
                                   aggregation=cfg.aggregation)

    def _wrap_reference(self, reference):
        if self.zero3:
            import deepspeed

            wrapped, *_ = deepspeed.initialize(model=reference, config=reference_config(self.cfg, self.micro_per_step))
            wrapped.eval()  # DeepSpeedEngine.eval() returns None, unlike nn.Module.eval()
            return wrapped
        if self.cfg.precision == "bf16":
            reference = reference.to(torch.bfloat16)
        return reference

    @property
    def module(self):
        return self.engine.module

    # ---- forward passes ---------------------------------------------------------------------------
    def _logits(self, model, batch: MicroBatch) -> torch.Tensor:
        """Logits of the positions that predict response tokens ([N, L-1-first, V])."""
        dev = self.device
        module = getattr(model, "module", model)  # a DeepSpeed engine hides the signature forward_inputs reads
        kwargs = forward_inputs(
            module, batch.input_ids.to(dev), batch.attention_mask.to(dev),
            batch.pixel_values.to(dev) if batch.pixel_values is not None else None,
            batch.image_grid_thw.to(dev) if batch.image_grid_thw is not None else None)
        return model(**kwargs, use_cache=False, logits_to_keep=batch.logits_to_keep).logits[:, :-1]

    @torch.no_grad()
    def logprobs(self, batch: MicroBatch, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs at the sampling temperature, without gradient (policy or reference)."""
        model = self.reference if reference else self.engine
        return token_logprobs(self._logits(model, batch), batch.targets.to(self.device), self.temperature)

    # ---- updates ----------------------------------------------------------------------------------
    def micro_step(self, batch: MicroBatch, logp_proximal: torch.Tensor | None = None) -> dict[str, float]:
        """Forward and backward one micro-batch; the optimizer steps at the accumulation boundary.

        `logp_proximal` is pi_prox, computed before the first update of the rollout batch; None
        means the current policy is the proximal one (one update per rollout batch).
        """
        mask = batch.mask.to(self.device)
        logits = self._logits(self.engine, batch)
        logp = token_logprobs(logits, batch.targets.to(self.device), self.temperature)
        logp_ref = self.logprobs(batch, reference=True) if self.reference is not None else None
        proximal = logp.detach() if logp_proximal is None else logp_proximal.to(self.device)
        loss, metrics = grpo_loss(logp, proximal, batch.behaviour_logp.to(self.device), logp_ref,
                                  batch.advantages.to(self.device), mask, self.loss_cfg)
        self.engine.backward(loss)
        if self._measure_grad_norm and self.engine.is_gradient_accumulation_boundary():
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self._grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.engine.step()
        with torch.no_grad():
            selected = logits[mask.bool()]
            metrics["entropy"] = entropy_from_logits(selected, self.temperature).mean().item() if len(selected) else 0.0
        metrics["loss"] = loss.item()
        return metrics

    def train_step(self, micro_batches: list[MicroBatch], proximal: list[torch.Tensor] | None = None
                   ) -> dict[str, float]:
        """One optimizer step over this rank's `micro_per_step` micro-batches; statistics over all ranks."""
        if len(micro_batches) != self.micro_per_step:
            raise ValueError(f"a step needs {self.micro_per_step} micro-batches per rank, got {len(micro_batches)}")
        started = time.perf_counter()
        totals: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            for key, value in self.micro_step(batch, proximal[i] if proximal else None).items():
                totals[key] = totals.get(key, 0.0) + value / len(micro_batches)
        totals["tokens"] = float(sum(b.n_tokens for b in micro_batches))
        totals["step_seconds"] = time.perf_counter() - started
        totals = self._reduce(totals)
        norm = self._grad_norm if self._measure_grad_norm else self.engine.get_global_grad_norm()
        totals["grad_norm"] = float(norm or 0.0)
        return totals

    def train_rollout_batch(self, updates: list[list[MicroBatch]]) -> list[dict[str, float]]:
        """Several optimizer steps on one rollout batch (decoupled PPO).

        With more than one update, pi_prox of the whole batch is computed before the first one, so
        every update's PPO ratio is taken against the policy the batch was accepted under, and the
        truncated IS weight pi_prox / pi_behaviour corrects for the rollout's staleness.
        """
        proximal = None
        if len(updates) > 1:
            proximal = [[self.logprobs(batch) for batch in update] for update in updates]
        return [self.train_step(update, proximal[u] if proximal else None) for u, update in enumerate(updates)]

    def _reduce(self, stats: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return stats
        from .ranks import comm_device

        keys = sorted(stats)
        values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=comm_device())
        dist.all_reduce(values)
        return {k: v if k in SUMMED_STATS else v / self.world for k, v in zip(keys, values.tolist())}

    # ---- weights out and state on disk -------------------------------------------------------------
    def export_state(self) -> dict[str, torch.Tensor] | None:
        """Full weights (the module's state_dict names) on rank 0, None on the others.

        Under ZeRO-3 every rank must call this: parameters are gathered one module at a time, in the
        same order on every rank, so that no rank runs ahead (and memory holds one module at a time).
        """
        if not self.zero3:
            return dict(self.engine.module.state_dict()) if self.rank == 0 else None
        import deepspeed

        state: dict[str, torch.Tensor] | None = {} if self.rank == 0 else None
        names_of: dict[int, str] = {}  # id(parameter) -> first name: tied weights stay one tensor

        def walk(module: torch.nn.Module, prefix: str) -> None:
            params = list(module.parameters(recurse=False))
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if state is not None:
                    for name, param in module.named_parameters(recurse=False):
                        first = names_of.setdefault(id(param), prefix + name)
                        state[prefix + name] = state[first] if first != prefix + name else param.detach().cpu().clone()
                    for name, buf in module.named_buffers(recurse=False):
                        if name not in module._non_persistent_buffers_set:
                            state[prefix + name] = buf.detach().cpu().clone()
            for name, child in module.named_children():
                walk(child, prefix + name + ".")

        walk(self.engine.module, "")
        return state

    def save_engine(self, path: Path) -> None:
        """Optimizer and engine state (DeepSpeed's own format, one shard per rank); every rank calls this."""
        self.engine.save_checkpoint(str(path), tag=ENGINE_TAG, save_latest=False)

    def load_engine(self, path: Path) -> None:
        # DeepSpeed reads these files with torch.load: only ever point it at checkpoints this learner wrote.
        loaded, _ = self.engine.load_checkpoint(str(path), tag=ENGINE_TAG)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed engine state under {path}")

    def save_hf(self, path: Path, processor, state: dict[str, torch.Tensor]) -> None:
        """An HF-format folder (safetensors, config, processor) that transformers and vLLM load as is."""
        self.engine.module.save_pretrained(path, state_dict=state)
        processor.save_pretrained(path)
