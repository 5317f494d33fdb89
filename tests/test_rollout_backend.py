"""The transformers backend on the real tiny model: behaviour log-probs are what the learner
recomputes, vision/control tokens are never sampled, per-prompt parameters, stop strings, prompt
limits, and version rules of weight swaps."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmupt.config import PromptSettings, load_settings
from mmupt.model import build_messages, encode_prompt, forward_inputs, render_prompt
from mmupt.services.rollout.backend import PromptTooLong, SamplingParams, prepare_prompt
from mmupt.services.rollout.hf_backend import TransformersBackend


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return TransformersBackend(load_settings(environ={}, overrides={
        "model": {"path": str(tiny_model_dir), "device": "cpu"}}).model)


def prompt_for(backend, problem="Which shape is shown? <image>", color="red", max_tokens=2048):
    text = render_prompt(backend.processor, build_messages(problem, 1, PromptSettings()))
    return prepare_prompt(backend.processor, text, [Image.new("RGB", (90, 70), color)], max_tokens)


def test_behaviour_logprobs_are_the_learners_log_softmax_at_the_temperature(backend):
    prompt = prompt_for(backend)
    (group,) = backend.generate([prompt], SamplingParams(n=3, temperature=0.7, max_new_tokens=12, seed=0))
    encoded = encode_prompt(backend.processor, prompt.text, prompt.images)
    for c in group.completions:
        ids = torch.tensor([group.prompt_ids + c.token_ids])
        kwargs = forward_inputs(backend.model, ids, torch.ones_like(ids), encoded["pixel_values"],
                                encoded["image_grid_thw"])
        with torch.no_grad():
            logits = backend.model(**kwargs).logits[0, len(group.prompt_ids) - 1:-1].float() / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)


def test_vision_and_control_tokens_are_never_sampled(backend):
    (group,) = backend.generate([prompt_for(backend)], SamplingParams(n=6, temperature=3.0, max_new_tokens=32,
                                                                     seed=1))
    sampled = {t for c in group.completions for t in c.token_ids}
    assert len(sampled) > 20                       # a hot random model spreads over the vocabulary...
    assert not sampled & set(sum(backend.banned, []))   # ...but never onto <|image_pad|> and friends
    for c in group.completions:                    # only a stop token may end a response
        assert all(t not in backend.stop_ids for t in c.token_ids[:-1])


def test_temperature_zero_decodes_greedily(backend):
    prompt = prompt_for(backend)
    runs = [backend.generate([prompt], SamplingParams(n=3, temperature=0.0, max_new_tokens=8, seed=seed))[0]
            for seed in (0, 1)]
    texts = [[c.token_ids for c in group.completions] for group in runs]
    assert len(texts[0]) == 3 and texts[0][0] == texts[0][1] == texts[0][2] == texts[1][0]
    encoded = encode_prompt(backend.processor, prompt.text, prompt.images)
    ids = torch.tensor([runs[0].prompt_ids + texts[0][0]])
    with torch.no_grad():   # each greedy token is the model's most likely next token
        logits = backend.model(**forward_inputs(backend.model, ids, torch.ones_like(ids), encoded["pixel_values"],
                                                encoded["image_grid_thw"])).logits[0]
    start = len(runs[0].prompt_ids) - 1
    banned = sum(backend.banned, [])
    logits[:, banned] = float("-inf")
    assert logits[start:start + len(texts[0][0])].argmax(-1).tolist() == texts[0][0]


def test_each_prompt_gets_its_own_sampling_parameters(backend):
    groups = backend.generate([prompt_for(backend), prompt_for(backend, color="blue")],
                              [SamplingParams(n=2, max_new_tokens=4, seed=0), SamplingParams(n=3, max_new_tokens=6)])
    assert [len(g.completions) for g in groups] == [2, 3]
    assert all(len(c.token_ids) <= 4 for c in groups[0].completions)


def test_a_stop_string_ends_the_response_before_it(backend):
    prompt = prompt_for(backend)
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=24, seed=5)
    (free,) = backend.generate([prompt], params)
    text, tokens = free.completions[0].text, free.completions[0].token_ids
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert len(stop) == 2
    (stopped,) = backend.generate([prompt], SamplingParams(n=1, temperature=1.0, max_new_tokens=24, seed=5,
                                                           stop=[stop]))
    c = stopped.completions[0]
    assert c.finish_reason == "stop" and c.text == text[:text.index(stop)]
    assert c.token_ids == tokens[:len(c.token_ids)] and len(c.logprobs) == len(c.token_ids)


def test_prompts_over_the_token_limit_are_refused(backend):
    with pytest.raises(PromptTooLong, match="over the limit of 20"):
        prompt_for(backend, max_tokens=20)


def test_weight_swaps_take_only_newer_versions(backend):
    state = {k: v.clone() for k, v in backend.state_dict().items()}
    start = backend.version
    assert not backend.swap_weights(state, start)
    assert backend.swap_weights(state, start + 1) and backend.version == start + 1
    assert not backend.swap_weights(state, start)
    (group,) = backend.generate([prompt_for(backend)], SamplingParams(n=1, max_new_tokens=2))
    assert group.policy_version == start + 1
