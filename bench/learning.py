"""Does it learn without labels? MM-UPT (majority-vote reward) vs supervised GRPO (ground-truth
reward) vs no training, the same budget, several seeds, on the tiny config's weak base model.

    python bench/learning.py [--config configs/tiny-cpu.yaml] [--seeds 0 1 2] [--steps 40]
                             [--eval-every 10] [--synth] [--out bench/results/learning]

Each arm trains with `mmupt run` (three services, embedded Valkey) for `--steps` optimizer steps per
seed; every `--eval-every` steps a checkpoint is evaluated on the held-out split (labels read for
evaluation only): `accuracy` (k samples at the rollout temperature), `maj_accuracy`, `greedy_accuracy`.
`--synth` adds the paper's second result: questions written by the base model itself from the
training images alone (`mmupt synth --mode direct`, filtered), then MM-UPT on those only.
Writes learning.json and learning.png (held-out accuracy, majority ratio and vote entropy per step)
and prints a table with each arm's gain and MM-UPT's gain as a share of supervised GRPO's.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmupt.config import load_settings  # noqa: E402
from mmupt.data import ensure_data  # noqa: E402
from mmupt.eval import heldout_accuracy, load_benchmark  # noqa: E402
from mmupt.model import ensure_model  # noqa: E402
from mmupt.run import run  # noqa: E402

log = logging.getLogger("bench.learning")
ARMS = {"mmupt": "majority", "supervised": "ground_truth", "mmupt_synth": "majority"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default learner.max_steps)")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-limit", type=int, default=None, help="first N held-out questions (default all)")
    p.add_argument("--arms", nargs="+", default=["mmupt", "supervised"], choices=["mmupt", "supervised"],
                   help="arms trained on the original questions")
    p.add_argument("--synth", action="store_true", help="also train on questions the base model wrote itself")
    p.add_argument("--synth-seeds", type=int, default=None, help="training images used as synthesis seeds (default all)")
    p.add_argument("--reuse", action="store_true",
                   help="keep finished runs found under --out (their checkpoints are evaluated again)")
    p.add_argument("--out", default="bench/results/learning")
    return p.parse_args(argv)


class Evaluator:
    def __init__(self, settings, limit: int | None):
        self.settings = settings
        self.items = load_benchmark(settings.data.eval, limit)
        self.k = settings.evaluation.k
        self.temperature = settings.rollout.temperature

    def __call__(self, model_dir: str) -> dict:
        return heldout_accuracy(self.settings, self.items, self.k, self.temperature,
                                self.settings.rollout.max_new_tokens, model_dir=model_dir)


def synthesise(settings, work: Path, limit: int | None) -> tuple[str, dict]:
    """Direct synthesis from the training images with the base model; returns the data file and report."""
    from mmupt.synth.command import run_synthesis  # noqa: PLC0415

    out = work / "synth" / "train.jsonl"
    report_file = work / "synth" / "train.report.json"
    if report_file.is_file():   # a finished synthesis with the same base model is reused
        report = json.loads(report_file.read_text())
        if report.get("status") == "finished" and report.get("model_version") == settings.model.path:
            log.info("reusing the synthetic questions in %s", out)
            return str(out), report
    if out.parent.exists():
        shutil.rmtree(out.parent)
    report = run_synthesis(settings, settings.data.train, out, mode="direct", model_dir=settings.model.path,
                           limit=limit, show_bar=True)
    return str(out), report


def train_one(settings, arm: str, seed: int, steps: int, every: int, data: str, work: Path, evaluate: Evaluator,
              reuse: bool = False) -> dict:
    s = settings.model_copy(deep=True)
    s.voter.reward_mode = ARMS[arm]
    s.data.train = data
    s.data.shuffle_seed = s.learner.seed = s.rollout.seed = seed
    s.learner.max_steps, s.learner.checkpoint_every = steps, every
    s.learner.keep_checkpoints = steps // every + 1
    s.evaluation.enabled = False   # this benchmark evaluates every checkpoint itself
    out = work / f"{arm}-seed{seed}"
    if reuse and (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        log.info("reusing the finished run in %s", out)
    else:
        if out.exists():
            shutil.rmtree(out)  # a half-finished or old run: start again
        summary = run(s, out, run_id=f"bench-{arm}-{seed}-{int(time.time())}")
    if summary["status"] != "finished":
        raise RuntimeError(f"{arm} seed {seed}: the run ended {summary['status']}; logs in {out / 'logs'}")
    curve = []
    for ckpt in sorted((out / "checkpoints").glob("step-*")):
        step = int(ckpt.name.split("-")[1])
        curve.append({"step": step, **evaluate(str(ckpt))})
    log_rows = [json.loads(line) for line in (out / "checkpoints" / "train_log.jsonl").read_text().splitlines()]
    return {"arm": arm, "seed": seed, "wall_seconds": summary["wall_seconds"], "curve": curve,
            "train": [{k: r.get(k) for k in ("step", "mean_reward", "majority_ratio", "vote_entropy", "label_accuracy")}
                      for r in log_rows],
            "groups_trained": summary["groups_trained"], "prompts_admitted": summary["prompts_admitted"]}


def aggregate(runs: list[dict], base: dict) -> dict:
    table = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        finals = [r["curve"][-1] for r in runs if r["arm"] == arm]
        row = {}
        for metric in ("accuracy", "maj_accuracy", "greedy_accuracy"):
            values = [f[metric] for f in finals]
            row[metric] = statistics.mean(values)
            row[f"{metric}_sd"] = statistics.pstdev(values)
        row["gain"] = row["accuracy"] - base["accuracy"]
        row["seeds"] = len(finals)
        row["prompts_admitted"] = statistics.mean(r["prompts_admitted"] for r in runs if r["arm"] == arm)
        table[arm] = row
    if "mmupt" in table and "supervised" in table and table["supervised"]["gain"] > 0:
        table["mmupt"]["share_of_supervised_gain"] = table["mmupt"]["gain"] / table["supervised"]["gain"]
        if "mmupt_synth" in table:
            table["mmupt_synth"]["share_of_supervised_gain"] = table["mmupt_synth"]["gain"] / table["supervised"]["gain"]
    return table


def format_table(base: dict, table: dict) -> str:
    lines = [f"{'arm':<14} {'seeds':>5} {'accuracy':>14} {'gain':>7} {'maj@k':>7} {'greedy':>7} {'vs supervised':>14} "
             f"{'prompts':>8}",
             "-" * 83,
             f"{'no training':<14} {'-':>5} {100 * base['accuracy']:>14.1f} {0:>7.1f} {100 * base['maj_accuracy']:>7.1f} "
             f"{100 * base['greedy_accuracy']:>7.1f} {'':>14}"]
    for arm, row in table.items():
        share = row.get("share_of_supervised_gain")
        lines.append(f"{arm:<14} {row['seeds']:>5} {100 * row['accuracy']:>8.1f} ± {100 * row['accuracy_sd']:<3.1f} "
                     f"{100 * row['gain']:>+7.1f} {100 * row['maj_accuracy']:>7.1f} {100 * row['greedy_accuracy']:>7.1f} "
                     f"{'' if share is None else f'{100 * share:.0f}%':>14} {row['prompts_admitted']:>8.0f}")
    return "\n".join(lines)


def plot(runs: list[dict], base: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {"mmupt": "tab:blue", "supervised": "tab:green", "mmupt_synth": "tab:orange"}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        arm_runs = [r for r in runs if r["arm"] == arm]
        for i, r in enumerate(arm_runs):
            label = arm if i == 0 else None
            steps = [0] + [p["step"] for p in r["curve"]]
            axes[0].plot(steps, [100 * base["accuracy"]] + [100 * p["accuracy"] for p in r["curve"]], marker="o",
                         color=colours[arm], alpha=0.7, label=label)
            train = [t for t in r["train"] if t.get("majority_ratio") is not None]
            axes[1].plot([t["step"] for t in train], [t["majority_ratio"] for t in train], color=colours[arm],
                         alpha=0.6, label=label)
            axes[2].plot([t["step"] for t in train], [t["vote_entropy"] for t in train], color=colours[arm],
                         alpha=0.6, label=label)
    axes[0].axhline(100 * base["accuracy"], color="grey", linestyle="--", label="no training")
    titles = ("held-out accuracy (%, sampled at T)", "majority ratio (training groups)", "vote entropy (nats)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    settings = load_settings(args.config)
    steps = args.steps or settings.learner.max_steps
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    ensure_model(settings.model)
    ensure_data(settings.data)
    settings.model.path = str(Path(settings.model.path).resolve())
    evaluate = Evaluator(settings, args.eval_limit)
    started = time.monotonic()
    base = evaluate(settings.model.path)
    log.info("no training: %s", base)
    plan = [(arm, settings.data.train) for arm in args.arms]
    synth_report = None
    if args.synth:
        synth_data, synth_report = synthesise(settings, work, args.synth_seeds)
        plan.append(("mmupt_synth", synth_data))
    runs = []
    total = len(plan) * len(args.seeds)
    for arm, data in plan:
        for seed in args.seeds:
            runs.append(train_one(settings, arm, seed, steps, args.eval_every, data, work, evaluate, args.reuse))
            done = len(runs)
            rate = (time.monotonic() - started) / done
            log.info("run %d/%d (%s seed %d): final accuracy %.3f | ETA %.0f s", done, total, arm, seed,
                     runs[-1]["curve"][-1]["accuracy"], rate * (total - done))
    table = aggregate(runs, base)
    result = {"config": args.config, "steps": steps, "seeds": args.seeds, "eval_k": evaluate.k,
              "eval_questions": len(evaluate.items), "temperature": evaluate.temperature, "base": base,
              "table": table, "runs": runs, "wall_seconds": round(time.monotonic() - started, 1)}
    if synth_report is not None:
        result["synth_report"] = {k: synth_report[k] for k in ("generated", "kept", "dropped") if k in synth_report}
    (out / "learning.json").write_text(json.dumps(result, indent=2))
    plot(runs, base, out / "learning.png")
    print(format_table(base, table))
    print(f"results: {out / 'learning.json'}  plot: {out / 'learning.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
