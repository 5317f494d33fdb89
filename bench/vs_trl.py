"""mmupt against TRL's GRPOTrainer: the same model, data, group size, batch, lengths and majority-vote reward.

Both train the model of --config (the tiny config's model unless --model names another folder) on
its training file for --steps optimizer steps, then both final policies are evaluated on the
held-out file (mmupt.eval, the hidden labels read for evaluation only: `accuracy` is the share of k
samples at the rollout temperature that are right, `maj_accuracy` the share of questions whose
majority of k is right). Reported: wall-clock seconds per optimizer step (first to last step, so
model loading and start-up are left out for both) and held-out accuracy, and the ratios.

- mmupt: `mmupt run` (rollout, voter and learner as separate processes), in the asynchronous
  default and with `learner.async: false` (on-policy, as TRL's loop is).
- TRL (`pip install -e ".[bench]"`, trl 1.16): `GRPOTrainer` in one process, generating with
  transformers. The reward function is mmupt's voter (services/voter: the last `\\boxed{}`, the
  configured grader and tie policy): each group of G completions of one prompt votes, and a
  completion in the majority class gets 1. The hyper-parameters are mapped one to one where TRL has
  them (learning rate, constant schedule, weight decay, gradient clip, KL coefficient to the initial
  policy, PPO clip low/high, token-mean loss = TRL's "dapo", one PPO epoch per batch, temperature,
  top_p, the same banned special tokens). Differences that remain: TRL has no dual clip and no
  truncated IS weight (mmupt's are inactive on fresh, on-policy groups anyway), TRL draws prompts
  in its own shuffled order, and TRL's generation is not overlapped with training.

Workarounds needed for trl 1.16 with transformers 5.x and Qwen2.5-VL: none found so far; the prompt
goes to TRL as a conversational prompt with an {"type": "image"} part and the image in an `image`
column (TRL's VLM path), the processor is the model folder's own.

    python bench/vs_trl.py [--config configs/tiny-cpu.yaml] [--model DIR] [--steps 10] [--eval-limit 64] [--eval-k 4]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

from mmupt import run as run_module
from mmupt.config import Settings, load_settings
from mmupt.data import Item, ensure_data, load_items
from mmupt.model import banned_token_ids, build_messages, ensure_model
from mmupt.services.learner.train_log import TrainLog

LOSS_TYPE = {"token_mean": "dapo", "seq_mean": "grpo"}  # mmupt's aggregation -> TRL's loss_type


def bench_settings(args) -> Settings:
    overrides: dict = {"learner": {"max_steps": args.steps, "checkpoint_every": 0, "updates_per_batch": 1}}
    if args.model:
        overrides["model"] = {"path": args.model}
    overrides["evaluation"] = {"enabled": False}  # this bench evaluates both systems itself, the same way
    return load_settings(args.config, environ={}, overrides=overrides)


# ---- mmupt --------------------------------------------------------------------------------------
def run_mmupt(settings: Settings, out: Path, asynchronous: bool) -> dict:
    mode = "async" if asynchronous else "sync"
    settings = settings.model_copy(deep=True)
    settings.learner.async_ = asynchronous
    summary = run_module.run(settings, out, run_id=f"bench-vs-trl-{mode}-{os.getpid()}")
    if summary["status"] != "finished":
        raise SystemExit(f"mmupt run ({mode}) did not finish: {summary['status']}")
    times = [row["time"] for row in TrainLog(out / "checkpoints" / "train_log.jsonl").rows()]
    return {"system": f"mmupt ({mode})", "steps": summary["steps"], "seconds_per_step": (times[-1] - times[0]) / (len(times) - 1),
            "wall_s": summary["wall_seconds"], "model_dir": summary["checkpoint"], "mean_reward": summary["mean_reward"]}


# ---- TRL ----------------------------------------------------------------------------------------
def trl_dataset(items: list[Item], settings: Settings):
    """TRL's VLM input: a conversational prompt with {"type": "image"} parts and the PIL images beside it.
    The text is mmupt's prompt (problem + the paper's suffix), built by the same function."""
    from datasets import Dataset
    from PIL import Image

    rows = []
    for item in items:
        messages = build_messages(item.problem, len(item.images), settings.prompt)
        rows.append({"prompt": messages, "images": [Image.open(io.BytesIO(b)).convert("RGB") for b in item.images],
                     "group_key": item.id})
    return Dataset.from_list(rows)


def majority_reward(settings: Settings):
    """A TRL reward function that votes each prompt's G completions with mmupt's voter code."""
    from mmupt.services.voter.main import grader_for
    from mmupt.services.voter.vote import VotePolicy, vote

    grader, policy = grader_for(settings.voter), VotePolicy.from_settings(settings.voter)

    def reward(prompts, completions, group_key, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = [0.0] * len(texts)
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(group_key):  # TRL lays out each prompt's G completions together
            groups.setdefault(key, []).append(i)
        for key, members in groups.items():
            result = vote([texts[i] for i in members], grader, "majority", policy=policy, key=key)
            for i, r in zip(members, result.rewards):
                rewards[i] = r
        return rewards

    reward.__name__ = "majority_vote"
    return reward


def run_trl(settings: Settings, out: Path) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rc, lc = settings.rollout, settings.learner
    processor = AutoProcessor.from_pretrained(settings.model.path)
    model = AutoModelForImageTextToText.from_pretrained(settings.model.path, dtype=getattr(torch, settings.model.dtype))
    step_times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(out), max_steps=lc.max_steps, seed=lc.seed, use_cpu=settings.model.device == "cpu",
        num_generations=rc.group_size, per_device_train_batch_size=lc.batch_groups * rc.group_size,
        gradient_accumulation_steps=1, num_iterations=1, max_completion_length=rc.max_new_tokens,
        temperature=rc.temperature, top_p=rc.top_p, top_k=0,
        generation_kwargs={"suppress_tokens": banned_token_ids(processor.tokenizer)},
        learning_rate=lc.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=lc.weight_decay,
        max_grad_norm=lc.grad_clip, beta=lc.kl_coef, epsilon=lc.clip_low, epsilon_high=lc.clip_high,
        loss_type=LOSS_TYPE[lc.aggregation], bf16=lc.precision == "bf16", report_to="none", logging_steps=1,
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )
    items = load_items(settings.data.train, settings.data, settings.streams)
    trainer = GRPOTrainer(model=model, reward_funcs=majority_reward(settings), args=config,
                          train_dataset=trl_dataset(items, settings), processing_class=processor, callbacks=[StepClock()])
    started = time.monotonic()
    trainer.train()
    wall = time.monotonic() - started
    model_dir = out / "final"
    trainer.save_model(str(model_dir))
    processor.save_pretrained(str(model_dir))
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    return {"system": "trl", "steps": trainer.state.global_step,
            "seconds_per_step": (step_times[-1] - step_times[0]) / (len(step_times) - 1),
            "wall_s": round(wall, 2), "model_dir": str(model_dir),
            "mean_reward": sum(rewards) / len(rewards) if rewards else None}


# ---- held-out evaluation ------------------------------------------------------------------------
def heldout(settings: Settings, model_dir: str, limit: int, k: int) -> dict:
    from mmupt.eval import EvalConfig, evaluate, load_benchmark
    from mmupt.sampler import open_sampler
    from mmupt.services.voter.main import grader_for

    items = load_benchmark(settings.data.eval, limit)
    sampler = open_sampler(settings, model_dir=model_dir)
    try:
        cfg = EvalConfig(k=k, temperature=settings.rollout.temperature, max_tokens=settings.rollout.max_new_tokens)
        overall = evaluate(items, sampler, cfg, grader_for(settings.voter), settings.prompt, show_bar=False)["summary"]["overall"]
    finally:
        sampler.close()
    return {"accuracy": overall[f"avg@{k}"], "maj_accuracy": overall[f"maj@{k}"], "k": k, "n": overall["n"]}


def plot(before: dict, results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    names = [r["system"] for r in results]
    colours = ["tab:blue", "tab:cyan", "tab:orange"]
    left.bar(names, [r["seconds_per_step"] for r in results], color=colours)
    left.set_ylabel("seconds per optimizer step")
    left.set_title(f"TRL / mmupt (async) = {results[-1]['seconds_per_step'] / results[0]['seconds_per_step']:.2f}x",
                   fontsize=10)
    right.bar(["base"] + names, [before["accuracy"]] + [r["eval"]["accuracy"] for r in results],
              color=["tab:gray"] + colours)
    right.set_ylabel(f"held-out accuracy (avg@{before['k']})")
    right.set_title(f"after {results[0]['steps']} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-cpu.yaml")
    parser.add_argument("--model", default=None, help="HF-format Qwen2.5-VL folder (default: the config's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval-limit", type=int, default=64, help="held-out questions")
    parser.add_argument("--eval-k", type=int, default=4, help="samples per held-out question")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    settings = bench_settings(args)
    ensure_model(settings.model)
    ensure_data(settings.data)
    work = Path(tempfile.mkdtemp(prefix="mmupt-vs-trl-"))
    rc, lc = settings.rollout, settings.learner
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; model {settings.model.path}; "
          f"{lc.max_steps} steps of {lc.batch_groups} prompts x G={rc.group_size} x <= {rc.max_new_tokens} new tokens",
          flush=True)
    before = heldout(settings, settings.model.path, args.eval_limit, args.eval_k)
    # mmupt's default (async) and, for an on-policy comparison with TRL's loop, mmupt with async: false.
    results = [run_mmupt(settings, work / "mmupt-async", True), run_mmupt(settings, work / "mmupt-sync", False),
               run_trl(settings, work / "trl")]
    for r in results:
        r["eval"] = heldout(settings, r["model_dir"], args.eval_limit, args.eval_k)
    speed = results[-1]["seconds_per_step"] / results[0]["seconds_per_step"]
    print(f"\n| system | s / step | steps / min | mean train reward | held-out accuracy (avg@{args.eval_k}) | "
          f"maj@{args.eval_k} |\n|---|---|---|---|---|---|")
    print(f"| base model | | | | {before['accuracy']:.3f} | {before['maj_accuracy']:.3f} |")
    for r in results:
        print(f"| {r['system']} | {r['seconds_per_step']:.2f} | {60 / r['seconds_per_step']:.1f} | "
              f"{r['mean_reward'] if r['mean_reward'] is None else round(r['mean_reward'], 3)} | "
              f"{r['eval']['accuracy']:.3f} | {r['eval']['maj_accuracy']:.3f} |")
    print(f"\nTRL / mmupt (async) seconds per step: {speed:.2f}x (above 1: mmupt is faster); held-out accuracy "
          f"mmupt {results[0]['eval']['accuracy']:.3f} (sync {results[1]['eval']['accuracy']:.3f}) vs TRL "
          f"{results[-1]['eval']['accuracy']:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "args": vars(args), "model": settings.model.path, "before": before, "results": results,
              "trl_over_mmupt_seconds_per_step": speed}
    (out / "vs_trl.json").write_text(json.dumps(record, indent=2))
    plot(before, results, out / "vs_trl.png")
    print(f"wrote {out / 'vs_trl.json'} and {out / 'vs_trl.png'}")


if __name__ == "__main__":
    main()
