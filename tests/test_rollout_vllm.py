"""The vLLM backend: everything that does not need vLLM is tested here on plain data shaped like
vLLM's (engine and sampling arguments, output conversion, version rules, weight specs, the swap
lock); the backend itself runs only where vLLM imports and a GPU exists."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from mmupt.config import load_settings
from mmupt.services.rollout.backend import PromptInput, SamplingParams
from mmupt.services.rollout.vllm_backend import (BANNED_LOGIT_BIAS, ReadWriteLock, VLLMError, check_one_version,
                                                 engine_kwargs, hf_weight_specs, read_safetensors_dir,
                                                 request_prompt, sampling_kwargs, to_completion)


@dataclass
class Logprob:          # the fields of vllm.logprobs.Logprob, as data
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class WeightVersionSpan:  # the fields of vllm.outputs.WeightVersionSpan, as data
    version: str
    start: int
    end: int


@pytest.fixture
def vllm_settings(tiny_model_dir):
    return load_settings(environ={}, overrides={
        "model": {"path": str(tiny_model_dir), "dtype": "bfloat16", "min_pixels": 3136, "max_pixels": 12544},
        "rollout": {"backend": "vllm", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.7,
                    "max_prompt_tokens": 1024, "max_new_tokens": 64, "max_request_new_tokens": 512,
                    "max_request_images": 3, "seed": 7}})


def test_engine_arguments_follow_the_settings(vllm_settings):
    kwargs = engine_kwargs(vllm_settings)
    assert kwargs["model"] == vllm_settings.model.path and kwargs["dtype"] == "bfloat16"
    assert (kwargs["tensor_parallel_size"], kwargs["gpu_memory_utilization"], kwargs["seed"]) == (2, 0.7, 7)
    assert kwargs["max_model_len"] == 1024 + 512
    assert kwargs["mm_processor_kwargs"] == {"min_pixels": 3136, "max_pixels": 12544}   # the learner's resize
    assert kwargs["limit_mm_per_prompt"] == {"image": 3, "video": 0}
    assert kwargs["logprobs_mode"] == "processed_logprobs" and kwargs["disable_log_stats"] is False
    assert "weight_transfer_config" not in kwargs
    vllm_settings.rollout.vllm_weight_transfer = "nccl"
    assert engine_kwargs(vllm_settings)["weight_transfer_config"] == {"backend": "nccl"}


def test_sampling_arguments_ban_vision_tokens_and_ask_for_sampled_logprobs():
    kwargs = sampling_kwargs(SamplingParams(n=4, temperature=0.7, top_p=0.99, max_new_tokens=32, seed=1,
                                            stop=["###"]), stop_ids=[5, 6], banned_ids=[3, 4])
    assert (kwargs["n"], kwargs["temperature"], kwargs["top_p"], kwargs["max_tokens"]) == (4, 0.7, 0.99, 32)
    assert kwargs["logprobs"] == 0 and kwargs["top_k"] == 0 and kwargs["seed"] == 1
    assert kwargs["logit_bias"] == {3: BANNED_LOGIT_BIAS, 4: BANNED_LOGIT_BIAS}
    assert kwargs["stop"] == ["###"] and kwargs["stop_token_ids"] == [5, 6]
    assert sampling_kwargs(SamplingParams(), [5], [])["stop"] is None


def test_outputs_convert_to_completions_with_the_sampled_tokens_logprobs():
    entries = [{11: Logprob(-0.25, 1), 12: Logprob(-3.0, 2)}, {13: Logprob(-1.5, 1)}, {5: -0.125}]
    completion = to_completion([11, 13, 5], entries, "x \\boxed{2}", "stop", stop=[])
    assert completion.token_ids == [11, 13, 5] and completion.logprobs == [-0.25, -1.5, -0.125]
    assert completion.finish_reason == "stop" and completion.text == "x \\boxed{2}"
    assert to_completion([11], entries[:1], "a ### b", "length", stop=["###"]).text == "a "
    with pytest.raises(VLLMError, match="abort"):
        to_completion([11], entries[:1], "", "abort", stop=[])
    with pytest.raises(VLLMError, match="log-prob"):
        to_completion([11, 13], None, "", "stop", stop=[])


def test_a_group_sampled_across_weight_versions_is_refused():
    check_one_version(None, 3)
    check_one_version([WeightVersionSpan("3", 0, 10)], 3)
    with pytest.raises(VLLMError, match="versions"):
        check_one_version([WeightVersionSpan("3", 0, 4), WeightVersionSpan("4", 4, 10)], 3)


def test_request_prompt_carries_images_only_when_there_are_some():
    assert request_prompt(PromptInput("hi", [])) == {"prompt": "hi"}
    assert request_prompt(PromptInput("hi", ["img"]))["multi_modal_data"] == {"image": ["img"]}


def test_weight_specs_are_the_learners_state_dict_names_and_shapes(vllm_settings, tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    learner = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    specs = hf_weight_specs(vllm_settings)
    assert {n: s for n, (s, _) in specs.items()} == {n: tuple(t.shape) for n, t in learner.items()}
    assert {d for _, d in specs.values()} == {torch.bfloat16}
    # What the engine loaded: the same tensors under the checkpoint's (older) names, which vLLM maps too.
    saved = read_safetensors_dir(tiny_model_dir)
    assert sorted(tuple(t.shape) for t in saved.values()) == sorted(s for s, _ in specs.values())


def test_the_swap_lock_waits_for_generations_and_holds_new_ones_back():
    lock, events = ReadWriteLock(), []

    def generation(name, hold):
        with lock.read():
            events.append(f"{name} start")
            time.sleep(hold)
            events.append(f"{name} end")

    def swap():
        with lock.write():
            events.append("swap")

    first = threading.Thread(target=generation, args=("a", 0.3))
    first.start()
    time.sleep(0.05)
    swapper = threading.Thread(target=swap)
    swapper.start()
    time.sleep(0.05)
    late = threading.Thread(target=generation, args=("b", 0.0))   # arrives while the swap waits
    late.start()
    for t in (first, swapper, late):
        t.join(5)
    assert events == ["a start", "a end", "swap", "b start", "b end"]


def test_the_vllm_backend_generates_and_swaps(vllm_settings):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    from PIL import Image

    from mmupt.model import build_messages, render_prompt
    from mmupt.services.rollout.backend import prepare_prompt
    from mmupt.services.rollout.vllm_backend import VLLMBackend

    vllm_settings.rollout.tensor_parallel_size = 1
    backend = VLLMBackend(vllm_settings)
    try:
        text = render_prompt(backend.processor, build_messages("Which shape? <image>", 1, vllm_settings.prompt))
        prompt = prepare_prompt(backend.processor, text, [Image.new("RGB", (64, 64), "red")], 1024)
        (group,) = backend.generate([prompt], SamplingParams(n=3, temperature=0.8, max_new_tokens=8, seed=0))
        assert len(group.completions) == 3 and group.policy_version == 0
        assert all(lp <= 0 for c in group.completions for lp in c.logprobs)
        assert not set(backend.banned) & {t for c in group.completions for t in c.token_ids}
        state = {k: v.float() for k, v in backend.state_dict().items()}
        assert backend.swap_weights(state, 1) and backend.version == 1
        assert not backend.swap_weights(state, 1)
    finally:
        backend.close()
