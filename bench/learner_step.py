"""Learner throughput: one GRPO optimizer step, weight export and checkpoint, per DeepSpeed setting.

Runs the real PolicyEngine on a fixed batch of groups sampled by the real rollout backend (the
tiny offline Qwen2.5-VL unless --model names another folder) and prints, per setting: seconds per
optimizer step, response tokens per second, time to export the full weights (what a push starts
with) and to write a checkpoint (engine state + HF folder). Also writes a PNG of the table.

    python bench/learner_step.py [--settings 0:fp32 2:fp32 3:fp32 0:bf16 0:fp32:freeze] [--steps 10]
    python -m deepspeed.launcher.runner --no_local_rank --num_gpus 2 bench/learner_step.py ...   # 2 ranks

A setting is ZERO_STAGE:PRECISION[:FLAG...] with flags freeze (freeze_vision), offload
(offload_optimizer: compiles DeepSpeed's CPU Adam on first use) and offload-params (stage 3). With
several ranks every rank runs its share of the micro-batches; rank 0 prints.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mmupt.config import load_settings
from mmupt.data import load_jsonl
from mmupt.images import decode_image
from mmupt.model import build_messages, build_tiny, load_processor, render_prompt
from mmupt.services.learner.batch import BatchBuilder, rank_share
from mmupt.services.learner.engine import PolicyEngine
from mmupt.services.rollout.backend import SamplingParams, prepare_prompt
from mmupt.services.rollout.hf_backend import TransformersBackend
from mmupt.services.rollout.main import group_seed
from mmupt.shapes_task import write_dataset
from mmupt.wire import GroupMsg, Response, Sampling, ScoredMsg, Vote, pack_floats, pack_ids


def sample_batch(settings, groups: int, group_size: int, new_tokens: int, backend: TransformersBackend | None = None,
                 items: list | None = None) -> list[tuple[ScoredMsg, list[bytes]]]:
    """`groups` groups sampled by the rollout backend (a fresh one unless given), half of each group rewarded.

    Prompts are prepared and seeded as the rollout server does (one processor pass, a seed per group):
    timing this is timing the server's sampling. `items` (default: read from data.train) keeps file
    reading out of a timed call."""
    backend = backend or TransformersBackend(settings.model)
    out = []
    for i, item in enumerate((items or load_jsonl(settings.data.train))[:groups]):
        params = SamplingParams(n=group_size, temperature=1.0, max_new_tokens=new_tokens, seed=group_seed(0, f"0:{i}"))
        images = [decode_image(b, 1 << 26, 1 << 26) for b in item.images]
        text = render_prompt(backend.processor, build_messages(item.problem, len(images), settings.prompt))
        prompt = prepare_prompt(backend.processor, text, images, settings.rollout.max_prompt_tokens)
        result = backend.generate([prompt], params)[0]
        responses = [Response(token_ids=pack_ids(c.token_ids), logprobs=pack_floats(c.logprobs), text=c.text,
                              finish_reason=c.finish_reason) for c in result.completions]
        group = GroupMsg(group_id=f"0:{i}", prompt_id=item.id, problem=item.problem, prompt_ids=pack_ids(result.prompt_ids),
                         policy_version=0, responses=responses,
                         sampling=Sampling(n=group_size, temperature=1.0, top_p=1.0, max_new_tokens=new_tokens))
        rewards = [float(j % 2 == 0) for j in range(group_size)]
        vote = Vote(rewards=rewards, answers=[None] * group_size, pseudo_label=None, majority_ratio=0.5,
                    vote_entropy=1.0, no_answer_rate=1.0, unanimous=False, reward_mode="bench")
        out.append((ScoredMsg(group=group, vote=vote), list(item.images)))
    return out


def measure(settings, sampled, steps: int, workdir: Path) -> dict[str, float]:
    engine = PolicyEngine(settings.model, settings.learner, settings.rollout.temperature)
    builder = BatchBuilder(settings, load_processor(settings.model))
    encoded = [(s, builder.encode(s, images)) for s, images in sampled]
    share = [builder.build(m) for m in rank_share(encoded, settings.learner.micro_groups, engine.rank, engine.world)]
    for _ in range(3):  # warm-up: the first steps in a process are several times slower on the CPU
        engine.train_step(share)
    times, tokens = [], 0.0
    for _ in range(steps):
        stats = engine.train_step(share)
        times.append(stats["step_seconds"])
        tokens = stats["tokens"]
    started = time.perf_counter()
    for _ in range(3):
        engine.export_state()
    export_s = (time.perf_counter() - started) / 3
    started = time.perf_counter()
    folder = workdir / f"ckpt-{time.monotonic_ns()}"
    engine.save_engine(folder / "engine")
    state = engine.export_state()
    if engine.rank == 0:
        engine.save_hf(folder, builder.processor, state)
    checkpoint_s = time.perf_counter() - started
    step_s = statistics.median(times)
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "export_s": export_s, "checkpoint_s": checkpoint_s,
            "rank": engine.rank, "world": engine.world}


def plot(rows: list[tuple[str, dict]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, label in zip(axes, ("step_s", "tokens_per_s", "export_s"),
                              ("s / optimizer step", "response tokens / s", "s / weight export")):
        ax.bar(names, [r[key] for _, r in rows])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=30)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["0:fp32", "2:fp32", "3:fp32", "0:bf16", "0:fp32:freeze"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--groups", type=int, default=4, help="groups per optimizer step")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--model", default=None, help="HF-format Qwen2.5-VL folder (default: the tiny one)")
    parser.add_argument("--png", default="runs/bench/learner_step.png")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mmupt-bench-"))
    model = args.model or str(build_tiny(work / "tiny"))
    write_dataset(work / "data", train_size=args.groups, eval_size=1, seed=0)
    base = {"model": {"path": model, "device": "auto"}, "data": {"train": str(work / "data" / "train.jsonl")}}
    import os

    import torch

    if os.environ.get("RANK", "0") == "0":
        print(f"machine: {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
              f"{'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
              f"{args.groups} groups x {args.group_size} responses x <= {args.new_tokens} tokens per step", flush=True)
    sampled = sample_batch(load_settings(environ={}, overrides=base), args.groups, args.group_size, args.new_tokens)
    rows = []
    for spec in args.settings:
        stage, precision, *flags = spec.split(":")
        settings = load_settings(environ={}, overrides=base | {"learner": {
            "batch_groups": args.groups, "micro_groups": 1, "zero_stage": int(stage), "precision": precision,
            "freeze_vision": "freeze" in flags, "offload_optimizer": "offload" in flags,
            "offload_params": "offload-params" in flags}})
        result = measure(settings, sampled, args.steps, work)
        rows.append((spec, result))
        if result["rank"] == 0:
            print(f"{spec:<16} ranks {result['world']}  step {result['step_s']:.3f} s  "
                  f"{result['tokens_per_s']:8.0f} tok/s  export {result['export_s'] * 1000:7.1f} ms  "
                  f"checkpoint {result['checkpoint_s']:.2f} s", flush=True)
    if rows and rows[0][1]["rank"] == 0:
        plot(rows, Path(args.png))
        print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
