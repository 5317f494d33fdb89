"""vLLM backend (GPUs), written against vLLM 0.33's documented API.

- Generation: `AsyncLLM` (vLLM's engine behind its own OpenAI server) runs on an event loop in its own
  thread; `generate()` may be called from several threads at once and vLLM batches them continuously.
  Each prompt is `{"prompt": text, "multi_modal_data": {"image": [...]}}` with the model's chat template
  applied by us, and images resized by the same processor settings as the learner
  (`mm_processor_kwargs` min/max pixels). Vision and control tokens get a logit bias of -100 (never
  sampled); log-probs come from `logprobs_mode="processed_logprobs"`, the log-softmax of the
  temperature-scaled logits vLLM samples from (see `ENGINE_NOTES` for the one difference with the
  transformers backend).
- Weight swaps (`swap_weights`, from the gRPC WeightSync push): the staged state is written as
  safetensors to tmpfs, then, with generation drained (`pause_generation(mode="wait")`, which also
  clears the KV, prefix and multimodal caches), every worker reloads it in place through
  `collective_rpc("reload_weights", weights_path=...)`; generation resumes. A reload that fails is rolled
  back by reloading the last good weights, so the server keeps serving its last good version.
- vLLM's native weight-transfer API (`init_weight_transfer_engine` / `start_weight_update` /
  `update_weights` / `finish_weight_update`, with pause/resume) is used by `receive_weights` for the
  collective path, where the learner broadcasts straight into the vLLM workers (NCCL).
- vLLM's own Prometheus metrics (`vllm:*`) register in this process's registry, so the service's
  /metrics serves them next to ours.

Everything that does not need vLLM itself (engine arguments, sampling arguments, output conversion,
version rules, weight specs) is a plain function, tested without a GPU.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mmupt.config import Settings
from mmupt.model import banned_token_ids, load_processor, stop_token_ids, torch_dtype

from .backend import Completion, GroupResult, PromptInput, SamplingParams, cut_at_stop, params_per_prompt

log = logging.getLogger(__name__)
BANNED_LOGIT_BIAS = -100.0     # vLLM's own clamp for logit_bias; e^-100 is never sampled
CONCURRENT_BATCHES = 8         # calls handed to the engine at once; it batches across them
ENGINE_NOTES = (
    "Behaviour log-probs: vLLM's processed_logprobs are log_softmax(logits / T) after its logit processors "
    "(the banned-token bias) and top_p; the transformers backend reports log_softmax(logits / T) before "
    "them. With top_p = 1 the two agree up to the banned tokens' probability mass."
)


class VLLMError(RuntimeError):
    pass


# ---- pure functions (tested without vLLM) ---------------------------------------------------------------
def engine_kwargs(settings: Settings) -> dict[str, Any]:
    """AsyncEngineArgs for the configured model and limits."""
    r, m = settings.rollout, settings.model
    kwargs: dict[str, Any] = {
        "model": m.path,
        "dtype": m.dtype,
        "tensor_parallel_size": r.tensor_parallel_size,
        "gpu_memory_utilization": r.gpu_memory_utilization,
        "max_model_len": r.max_prompt_tokens + max(r.max_new_tokens, r.max_request_new_tokens),
        "limit_mm_per_prompt": {"image": r.max_request_images, "video": 0},
        # The learner's image preprocessing: Qwen smart resize within [min_pixels, max_pixels].
        "mm_processor_kwargs": {"min_pixels": m.min_pixels, "max_pixels": m.max_pixels},
        "logprobs_mode": "processed_logprobs",
        "generation_config": "vllm",      # sampling is exactly what we ask, not the checkpoint's defaults
        "enable_prefix_caching": True,    # a group shares its prompt; caches are cleared on every swap
        "disable_log_stats": False,       # vLLM's Prometheus metrics
    }
    if r.seed is not None:
        kwargs["seed"] = r.seed
    if r.vllm_weight_transfer is not None:
        kwargs["weight_transfer_config"] = {"backend": r.vllm_weight_transfer}
    return kwargs


def sampling_kwargs(params: SamplingParams, stop_ids: list[int], banned_ids: list[int]) -> dict[str, Any]:
    """vllm.SamplingParams arguments with the transformers backend's semantics."""
    return {
        "n": params.n, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0,
        "max_tokens": params.max_new_tokens, "seed": params.seed, "stop": list(params.stop) or None,
        "stop_token_ids": list(stop_ids), "logprobs": 0,  # 0: only the sampled token's log-prob
        "logit_bias": {int(i): BANNED_LOGIT_BIAS for i in banned_ids},
        "skip_special_tokens": True, "include_stop_str_in_output": False,
    }


def request_prompt(prompt: PromptInput) -> dict[str, Any]:
    request: dict[str, Any] = {"prompt": prompt.text}
    if prompt.images:
        request["multi_modal_data"] = {"image": list(prompt.images)}
    return request


def sampled_logprobs(token_ids: list[int], entries) -> list[float]:
    """The sampled token's log-prob at each position ({token id: Logprob} per position, as vLLM gives)."""
    if entries is None or len(entries) != len(token_ids):
        raise VLLMError("vLLM returned no log-prob for some sampled tokens (logprobs=0 was requested)")
    out = []
    for token, entry in zip(token_ids, entries):
        value = entry[token]
        out.append(float(getattr(value, "logprob", value)))
    return out


def to_completion(token_ids: list[int], entries, text: str, finish_reason: str | None,
                  stop: list[str]) -> Completion:
    if finish_reason not in ("stop", "length"):
        raise VLLMError(f"vLLM finished a sample with reason {finish_reason!r}")
    ids = list(token_ids)
    text, _ = cut_at_stop(text, stop)  # vLLM already cuts stop strings; this keeps both backends equal
    return Completion(token_ids=ids, logprobs=sampled_logprobs(ids, entries), text=text, finish_reason=finish_reason)


def check_one_version(spans, version: int) -> None:
    """vLLM labels output tokens with the weight version that sampled them: a group is one version."""
    labels = {str(span.version) for span in spans or []}
    if labels - {str(version)}:
        raise VLLMError(f"tokens sampled by weight versions {sorted(labels)}, expected only {version}")


def hf_weight_specs(settings: Settings) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the Hugging Face state dict a push carries (the learner's names),
    from the model's config on the meta device: no weights are read."""
    from transformers import AutoConfig, AutoModelForImageTextToText  # noqa: PLC0415

    config = AutoConfig.from_pretrained(settings.model.path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    dtype = torch_dtype(settings.model.dtype)
    return {name: (tuple(t.shape), dtype if t.is_floating_point() else t.dtype)
            for name, t in model.state_dict().items()}


def read_safetensors_dir(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # noqa: PLC0415

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise VLLMError(f"no *.safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


class ReadWriteLock:
    """Many generations at once, or one weight swap; a waiting swap blocks new generations."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


# ---- the backend ----------------------------------------------------------------------------------------
class VLLMBackend:
    concurrent_batches = CONCURRENT_BATCHES

    def __init__(self, settings: Settings, version: int = 0):
        import vllm  # noqa: PLC0415 (GPU images only)
        from vllm.sampling_params import RequestOutputKind  # noqa: PLC0415
        from vllm.v1.engine.async_llm import AsyncLLM  # noqa: PLC0415

        self.settings = settings
        self._vllm, self._final_only = vllm, RequestOutputKind.FINAL_ONLY
        # The learner's processor renders the chat template and counts prompt tokens.
        self.processor = load_processor(settings.model)
        self.stop_ids = stop_token_ids(self.processor.tokenizer)
        self.banned = banned_token_ids(self.processor.tokenizer)
        self._lock = ReadWriteLock()
        self._version = version
        # Where the serving weights can be read back (None after a native weight transfer).
        self._serving_path: str | None = str(settings.model.path)
        self._weights_root = Path(settings.rollout.vllm_weights_dir) / f"{os.getpid()}"
        self._specs: dict | None = None
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True).start()

        kwargs = engine_kwargs(settings)
        if "weight_transfer_config" in kwargs:
            from vllm.config import WeightTransferConfig  # noqa: PLC0415

            kwargs["weight_transfer_config"] = WeightTransferConfig(**kwargs["weight_transfer_config"])

        async def create():  # on the engine's loop, so that its output handler runs there
            return AsyncLLM.from_engine_args(vllm.AsyncEngineArgs(**kwargs))

        self.engine = self._run(create())
        log.info("vLLM %s engine ready (%s); %s", vllm.__version__, settings.model.path, ENGINE_NOTES)

    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def version(self) -> int:
        return self._version

    # ---- generation ----
    def generate(self, prompts: list[PromptInput],
                 params: SamplingParams | list[SamplingParams]) -> list[GroupResult]:
        per_prompt = params_per_prompt(params, len(prompts))
        with self._lock.read():  # a swap waits for this call; the whole call is one version
            version = self._version
            return self._run(asyncio.gather(*[self._generate_one(p, sp, version)
                                              for p, sp in zip(prompts, per_prompt)]))

    async def _generate_one(self, prompt: PromptInput, params: SamplingParams, version: int) -> GroupResult:
        sampling = self._vllm.SamplingParams(**sampling_kwargs(params, self.stop_ids, self.banned),
                                             output_kind=self._final_only)
        final = None
        async for output in self.engine.generate(request_prompt(prompt), sampling, request_id=uuid.uuid4().hex):
            final = output
        if final is None:
            raise VLLMError("vLLM returned no output")
        completions = []
        for out in sorted(final.outputs, key=lambda o: o.index):
            check_one_version(getattr(out, "weight_versions", None), version)
            completions.append(to_completion(out.token_ids, out.logprobs, out.text, out.finish_reason, params.stop))
        return GroupResult(prompt_ids=list(final.prompt_token_ids), completions=completions, policy_version=version)

    # ---- weights ----
    def weight_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self._specs is None:
            self._specs = hf_weight_specs(self.settings)
        return self._specs

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The serving weights, read back from their safetensors: the checkpoint (under its own tensor
        names, which vLLM maps as it loads) or the last push (under the learner's names)."""
        if self._serving_path is None:
            raise VLLMError("the serving weights arrived through vLLM's weight-transfer engine and have no "
                            "copy on this host")
        return read_safetensors_dir(self._serving_path)

    def swap_weights(self, state: dict[str, torch.Tensor], version: int) -> bool:
        from safetensors.torch import save_file  # noqa: PLC0415

        with self._lock.write():
            if version <= self._version:
                return False
            path = self._weights_root / f"v{version}"
            path.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
            try:
                self._run(self._reload(str(path), version))
            except Exception:
                shutil.rmtree(path, ignore_errors=True)
                if self._serving_path is None:
                    log.exception("vLLM reload of version %d failed and there is no host copy to roll back to",
                                  version)
                    raise
                log.exception("vLLM reload of version %d failed; reloading version %d", version, self._version)
                self._run(self._reload(self._serving_path, self._version))
                raise
            previous, self._serving_path, self._version = self._serving_path, str(path), version
            if Path(previous).parent == self._weights_root:
                shutil.rmtree(previous, ignore_errors=True)
            return True

    async def _reload(self, path: str, version: int) -> None:
        await self.engine.pause_generation(mode="wait", clear_cache=True)
        try:
            await self.engine.collective_rpc("reload_weights",
                                             kwargs={"weights_path": path, "is_checkpoint_format": True})
            await self.engine.update_weight_version(str(version))
        finally:
            await self.engine.resume_generation()

    def init_weight_transfer(self, init_info: dict) -> None:
        """Join vLLM's weight-transfer engine (rollout.vllm_weight_transfer, e.g. "nccl") with the sender."""
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest  # noqa: PLC0415

        self._run(self.engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info)))

    def receive_weights(self, version: int, update_infos: Iterable[dict]) -> bool:
        """Swap to `version` through vLLM's native weight-transfer API while the sender transmits
        (one update_weights call per announced chunk); False if `version` is not newer. The bytes go
        straight to the GPUs: there is no host copy to roll back to if the sender fails mid-way."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest  # noqa: PLC0415

        async def transfer():
            await self.engine.pause_generation(mode="wait", clear_cache=True)
            try:
                await self.engine.start_weight_update()
                for info in update_infos:
                    await self.engine.update_weights(WeightTransferUpdateRequest(update_info=info))
                await self.engine.finish_weight_update(weight_version=str(version))
            finally:
                await self.engine.resume_generation()

        with self._lock.write():
            if version <= self._version:
                return False
            self._run(transfer())
            self._version, self._serving_path = version, None
            return True

    def close(self) -> None:
        self.engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        shutil.rmtree(self._weights_root, ignore_errors=True)
