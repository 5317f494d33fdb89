"""`mmupt run --dry-run`: the recipe configs validate, and the plan's arithmetic matches hand-computed values."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmupt.architectures import find_architecture, size_from_name
from mmupt.cli import main
from mmupt.config import load_settings
from mmupt.plan import GiB, build_plan

CONFIG_7B = "configs/qwen2_5_vl_7b_mmr1.yaml"
CONFIG_3B = "configs/qwen2_5_vl_3b_mmr1.yaml"
P_7B = 8_292_166_656          # Qwen2.5-VL-7B-Instruct: 8.29 B parameters
P_3B = 3_754_622_976          # Qwen2.5-VL-3B-Instruct: 3.75 B (tied embeddings counted once)


def settings_7b(**sections):
    return load_settings(CONFIG_7B, environ={}, overrides=sections)


def test_public_architectures_have_the_published_sizes():
    seven = find_architecture("models/Qwen2.5-VL-7B-Instruct")
    three = find_architecture("/anywhere/qwen2_5_vl_3b")
    assert (seven.params, three.params) == (P_7B, P_3B)
    assert (seven.layers, seven.hidden_size, seven.kv_heads, seven.vocab_size) == (28, 3584, 4, 152064)
    assert (three.layers, three.hidden_size, three.kv_heads, three.vocab_size) == (36, 2048, 2, 151936)
    assert 0.66e9 < seven.vision_params < 0.69e9  # the 32-block vision tower with its merger
    assert size_from_name("Qwen2.5-VL-72B-Instruct") is None and size_from_name("llava") is None


def test_recipe_config_validates_and_has_the_papers_values():
    s = settings_7b()
    assert (s.rollout.group_size, s.rollout.temperature, s.rollout.top_p) == (10, 0.7, 0.99)
    assert (s.rollout.max_new_tokens, s.rollout.max_prompt_tokens, s.rollout.backend) == (2048, 2048, "vllm")
    assert (s.learner.batch_groups * s.learner.updates_per_batch, s.learner.batch_groups) == (512, 128)
    assert (s.learner.lr, s.learner.weight_decay, s.learner.grad_clip, s.learner.kl_coef) == (1e-6, 0.01, 1.0, 0.01)
    assert (s.learner.clip_low, s.learner.clip_high, s.learner.dual_clip) == (0.2, 0.3, 3.0)
    assert (s.model.min_pixels, s.model.max_pixels, s.model.dtype) == (512 * 512, 1536 * 28 * 28, "bfloat16")
    assert s.learner.freeze_vision is False and s.voter.reward_mode == "majority"
    three = load_settings(CONFIG_3B, environ={})
    assert three.rollout.model_dump() == s.rollout.model_dump() | {"prompts_per_batch": 32}


def test_batch_arithmetic_of_the_recipe():
    f = build_plan(settings_7b(), CONFIG_7B).figures
    assert f["prompts_per_rollout_step"] == 512 and f["responses_per_rollout_step"] == 5120
    assert f["responses_per_optimizer_step"] == 1280 and f["micro_batch_sequences"] == 10
    assert f["gradient_accumulation"] == 128 / 4 / 1  # groups per rank / micro_groups
    assert f["admission_window"] == (3 + 1) * 128
    assert f["gpus"] == 8 and f["nodes"] == 1


def test_learner_memory_of_the_recipe_by_hand():
    plan = build_plan(settings_7b(), CONFIG_7B)
    # ZeRO-3 over 4 ranks, bf16: weights 2P/4 + gradients 2P/4 + AdamW 12P/4, reference 2P,
    # buckets 2 B x 1.55e9 elements, CUDA context 1 GiB.
    by_hand = (2 / 4 + 2 / 4 + 12 / 4 + 2) * P_7B + 2 * 1.55e9 + GiB
    assert plan.figures["learner_states_gib"] == pytest.approx(by_hand / GiB, rel=1e-9)
    assert 45 < plan.figures["learner_states_gib"] < 80  # the model states fit an 80 GB GPU...
    # ...but a micro-batch of 10 full-length sequences does not, with this learner: it says so.
    assert any("micro-batch at maximum lengths" in w for w in plan.warnings)
    text = plan.render()
    for heading in ("processes and GPUs", "batch arithmetic", "learner memory per GPU", "rollout memory per GPU"):
        assert heading in text
    assert "deepspeed --include localhost:4,5,6,7 --no_local_rank --module mmupt learner" in text


def test_activation_bound_by_hand():
    s = settings_7b()
    plan = build_plan(s, CONFIG_7B)
    h, i, layers, vocab = 3584, 18944, 28, 152064
    per_token = layers * (34 * h + 8 * i) + 14 * vocab
    assert plan.figures["activation_bytes_per_token"] == per_token
    patches = 4 * 1536
    per_image = patches * 32 * (34 * 1280 + 8 * 3420)
    assert plan.figures["learner_activations_gib"] == pytest.approx(10 * (4096 * per_token + per_image) / GiB)


def test_offload_stage0_and_fp32_terms():
    plan = build_plan(settings_7b(learner={"zero_stage": 2, "offload_optimizer": True}), CONFIG_7B)
    assert plan.figures["learner_host_gib"] == pytest.approx(4 * (12 + 4) * P_7B / 4 / GiB)
    gpu = (2 + 2 / 4 + 2) * P_7B + 2 * 1e9 + GiB  # weights, gradient shard, reference, buckets, context
    assert plan.figures["learner_states_gib"] == pytest.approx(gpu / GiB)

    three = load_settings(CONFIG_3B, environ={}, overrides={"learner": {"zero_stage": 0}})
    plan = build_plan(three, CONFIG_3B)
    # bf16 without ZeRO: DeepSpeed's bf16 optimizer shards master+moments but adds an fp32 grad accumulator.
    gpu = (2 + 2 + 4 + 12 / 2 + 2) * P_3B + 2 * 5e8 + GiB
    assert plan.figures["learner_states_gib"] == pytest.approx(gpu / GiB)

    plan = build_plan(load_settings(CONFIG_3B, environ={}, overrides={
        "learner": {"zero_stage": 0, "precision": "fp32", "kl_coef": 0.0}}), CONFIG_3B)
    assert plan.figures["learner_states_gib"] == pytest.approx(((4 + 4 + 8) * P_3B + 4 * 5e8 + GiB) / GiB)


def test_frozen_vision_tower_is_not_trained():
    plan = build_plan(settings_7b(learner={"freeze_vision": True}), CONFIG_7B)
    arch = find_architecture("Qwen2.5-VL-7B-Instruct")
    assert plan.figures["trainable_params"] == arch.params - arch.vision_params


def test_inconsistent_settings_are_warned():
    plan = build_plan(settings_7b(rollout={"tensor_parallel_size": 8}, deployment={"rollout_servers": 1},
                                  learner={"batch_groups": 100, "micro_groups": 2, "max_staleness": 1}), CONFIG_7B)
    text = "\n".join(plan.warnings)
    assert "tensor_parallel_size 8 does not divide the 28 attention heads" in text
    assert "batch_groups 100 is not a multiple of micro_groups 2 x learner ranks 4" in text
    assert "max_staleness 1 < updates_per_batch - 1 = 3" in text
    plan = build_plan(settings_7b(deployment={"learner_ranks": 1}), CONFIG_7B)
    assert any("model states alone need" in w for w in plan.warnings)


def test_placement_across_nodes():
    """A TP group never spans nodes; the learner's ranks follow the rollout servers."""
    s = settings_7b(rollout={"tensor_parallel_size": 4}, deployment={"rollout_servers": 3, "learner_ranks": 6})
    plan = build_plan(s, CONFIG_7B)
    assert plan.figures["gpus"] == 3 * 4 + 6 and plan.figures["nodes"] == 3
    text = plan.render()
    assert "rollout 1  vllm, node 0 GPU 4,5,6,7" in text and "rollout 2  vllm, node 1 GPU 0,1,2,3" in text
    assert "learner    6 rank(s), nodes 1-2 GPU 4,5,6,7,0,1" in text
    assert any("hostfile" in w for w in plan.warnings)


def test_data_rows_and_epochs_when_the_file_is_here(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": f"q{i}", "images": [], "answer": "1"} for i in range(64)]), path)
    plan = build_plan(settings_7b(data={"train": str(path)}), CONFIG_7B)
    assert plan.figures["train_items"] == 64
    assert "12800 prompts = 200.00 epochs of 64 items" in plan.render()


def test_cli_dry_run_prints_the_plan_and_starts_nothing(capsys):
    assert main(["run", "--config", CONFIG_7B, "--dry-run", "--max-steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "mmupt plan for configs/qwen2_5_vl_7b_mmr1.yaml" in out and "max_steps 8 x 128" in out
    assert "8 GPUs on 1 node(s) of 8" in out


def test_cli_dry_run_reads_the_model_folders_config(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMUPT_MODEL__PATH", str(tiny_model_dir))
    assert main(["run", "--config", "configs/tiny-cpu.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "its config.json" in out and "none (model.device is cpu)" in out


def test_cli_dry_run_refuses_an_unknown_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMUPT_MODEL__PATH", str(tmp_path / "my-model"))
    assert main(["run", "--config", CONFIG_7B, "--dry-run"]) == 2
    assert "no config.json here and its name does not name a known architecture" in capsys.readouterr().err
    monkeypatch.setenv("MMUPT_DEPLOYMENT__LEARNER_RANK", "2")
    assert main(["run", "--config", CONFIG_7B, "--dry-run"]) == 2
    assert "deployment.learner_rank: unknown field" in capsys.readouterr().err
