"""Synthetic-question benchmark: what `mmupt synth` produces and how fast, and (optionally) what
training on the synthesised questions gains next to training on the original ones.

    python bench/synth.py [--model DIR | --url URL] [--seeds 16] [--lenient] [--train-steps N] [--out runs/bench-synth]

1. Synthesis: both modes (in-context, direct) on two seed sets: the shapes task's training split
   (`mmupt make-data`) and the first `--seeds` questions of MATH-V testmini (../shared/data). For
   each: seeds, questions generated, kept, every filter's drops, questions/s and seconds per seed.
   `--lenient` switches off the marker rule and the majority threshold, for models (like the random
   tiny one) that cannot follow the prompt; the other filters stay on.
2. With `--train-steps N` (> 0, shapes only): held-out accuracy of the base model, then of a
   `mmupt run` of N steps on the original questions and of one on the direct-synthesised questions
   (same config, only the data path differs), and the two gains side by side.

Prints tables; writes synth.json and synth.png (and learning.png with --train-steps) to --out.
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: on a shared 2-core machine busy-waiting slows small ops ~100x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mmupt.config import load_settings  # noqa: E402
from mmupt.model import ensure_model  # noqa: E402
from mmupt.service import configure_logging  # noqa: E402
from mmupt.shapes_task import write_dataset  # noqa: E402
from mmupt.synth.command import run_synthesis  # noqa: E402
from mmupt.synth.filters import REASONS  # noqa: E402

log = logging.getLogger("bench.synth")
MODES = ("in-context", "direct")
LENIENT = {"require_marker": False, "min_majority_share": 0.0, "min_words": 1}


def find_math_v() -> Path | None:
    for parent in ROOT.parents:
        candidate = parent / "shared" / "data" / "math-v-testmini" / "testmini.jsonl"
        if candidate.is_file():
            return candidate
    return None


def base_settings(args):
    overrides = {"synth": dict(LENIENT) if args.lenient else {}}
    if args.model:
        overrides["model"] = {"path": args.model}
    settings = load_settings(args.config, overrides=overrides)
    if not args.url:
        ensure_model(settings.model)
    return settings


def seed_sets(settings, out: Path, seeds: int) -> dict[str, tuple[Path, object]]:
    """name -> (seed file, settings that read it)."""
    shapes = out / "shapes"
    if not (shapes / "train.jsonl").is_file():
        write_dataset(shapes, train_size=max(seeds, 64), eval_size=64, seed=0)
    sets = {"shapes": (shapes / "train.jsonl", settings)}
    math_v = find_math_v()
    if math_v is None:
        log.warning("MATH-V testmini not found beside the checkout: skipped")
        return sets
    mv = settings.model_copy(deep=True)
    mv.data.problem_column, mv.data.images_column, mv.data.image_root = "question", "image", str(math_v.parent)
    sets["math-v"] = (math_v, mv)
    return sets


def synthesis(args, settings, out: Path) -> list[dict]:
    rows = []
    for name, (seed_file, data_settings) in seed_sets(settings, out, args.seeds).items():
        for mode in MODES:
            report = run_synthesis(data_settings, seed_file, out / f"{name}-{mode}.jsonl", mode=mode, url=args.url,
                                   limit=args.seeds, show_bar=True)
            rows.append({"seeds_from": name, **report})
    return rows


def synthesis_table(rows: list[dict]) -> str:
    header = f"{'seeds':<8} {'mode':<11} {'seeds':>5} {'gen':>5} {'kept':>5}  {'drops':<60} {'q/s':>6} {'s/seed':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        drops = ", ".join(f"{k} {v}" for k, v in r["dropped"].items() if v) or "-"
        lines.append(f"{r['seeds_from']:<8} {r['mode']:<11} {r['seeds']:>5} {r['generated']:>5} {r['kept']:>5}  "
                     f"{drops:<60} {r['questions_per_second']:>6.2f} {r['wall_seconds'] / max(1, r['seeds']):>7.2f}")
    return "\n".join(lines)


def plot_synthesis(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["kept", *REASONS]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        values = [r["kept"], *(r["dropped"][k] for k in REASONS)]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=f"{r['seeds_from']} {r['mode']}")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("questions")
    ax.set_title(f"where the generated questions went ({rows[0]['model_version']})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- 2. training on synthesised vs original questions -------------------------------------------------
def held_out_accuracy(settings, model_dir: str, test_file: Path, out: Path, k: int, limit: int) -> dict:
    from mmupt.eval import EvalConfig, run_evaluation

    cfg = EvalConfig(k=k, temperature=settings.rollout.temperature, max_tokens=settings.rollout.max_new_tokens)
    return run_evaluation(settings, test_file, out, cfg, model_dir=model_dir, limit=limit)["summary"]["overall"]


def learning(args, settings, out: Path) -> dict:
    from mmupt.run import run

    shapes = out / "shapes"
    test = shapes / "test.jsonl"
    base = settings.model.path
    results = {"base": held_out_accuracy(settings, base, test, out / "eval-base", args.k, args.eval_limit)}
    for name, train in (("original", shapes / "train.jsonl"), ("synthetic", out / "shapes-direct.jsonl")):
        run_settings = settings.model_copy(deep=True)
        run_settings.data.train, run_settings.data.eval = str(train), str(test)
        run_settings.learner.max_steps = args.train_steps
        summary = run(run_settings, out / f"run-{name}")
        if summary["status"] != "finished":
            raise SystemExit(f"the run on the {name} questions did not finish: {summary}")
        results[name] = held_out_accuracy(settings, summary["checkpoint"], test, out / f"eval-{name}", args.k,
                                          args.eval_limit)
    metric = f"avg@{args.k}"
    for name in ("original", "synthetic"):
        results[name]["gain"] = results[name][metric] - results["base"][metric]
    return results


def learning_table(results: dict, k: int) -> str:
    lines = [f"{'trained on':<12} {'accuracy':>9} {f'avg@{k}':>8} {f'maj@{k}':>8} {'gain (avg)':>11}"]
    for name, r in results.items():
        gain = f"{100 * r['gain']:+.1f}" if "gain" in r else "-"
        lines.append(f"{name:<12} {100 * r['accuracy']:>9.1f} {100 * r[f'avg@{k}']:>8.1f} {100 * r[f'maj@{k}']:>8.1f} {gain:>11}")
    return "\n".join(lines)


def plot_learning(results: dict, k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    names = list(results)
    ax.bar(names, [100 * results[n][f"avg@{k}"] for n in names], color=["#888", "#37a", "#2a7"])
    ax.set_ylabel(f"held-out avg@{k} (%)")
    ax.set_title("shapes task: base vs trained on original / synthetic questions", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="model folder (default: the config's, the tiny one built on first use)")
    source.add_argument("--url", help="a rollout server to synthesise through")
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"))
    parser.add_argument("--seeds", type=int, default=16, help="seeds per seed set")
    parser.add_argument("--lenient", action="store_true", help="marker rule and majority threshold off")
    parser.add_argument("--train-steps", type=int, default=0, help="> 0: compare training on original and synthetic questions")
    parser.add_argument("--k", type=int, default=4, help="samples per held-out question")
    parser.add_argument("--eval-limit", type=int, default=64, help="held-out questions evaluated")
    parser.add_argument("--out", default="runs/bench-synth")
    args = parser.parse_args()
    configure_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = base_settings(args)
    rows = synthesis(args, settings, out)
    print(synthesis_table(rows))
    plot_synthesis(rows, out / "synth.png")
    result = {"synthesis": rows}
    if args.train_steps > 0:
        if args.url:
            raise SystemExit("--train-steps trains local models: use it with --model, not --url")
        result["learning"] = learning(args, settings, out)
        print(learning_table(result["learning"], args.k))
        plot_learning(result["learning"], args.k, out / "learning.png")
    (out / "synth.json").write_text(json.dumps(result, indent=2))
    print(f"results: {out / 'synth.json'}  plots: {out / 'synth.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
