"""Fault injection at a larger scale than CI: every fault kind, several rounds, Redis memory sampled.

    .venv/bin/python bench/faults.py [--rounds 3] [--steps-between 4] [--faults kill_voter,...] [--out runs/bench-faults]

Starts a real Valkey server with AOF persistence (fsync always), two rollout servers, a voter and a
learner on the tiny model (mmupt/faults.py), then injects each fault kind `--rounds` times, in a
shuffled order per round, waiting for `--steps-between` learner steps after each. After each fault it
takes the account (admitted = trained + dropped + dead-lettered + in flight; every prompt in flight
located in a stream or the replay list; no group in two checkpoint commits). At the end the learner is
resumed with max_steps covering what it admitted, so nothing may be left in flight. Redis
`used_memory` and every stream's length are sampled every `--memory-every` seconds through the run:
the stream caps must keep memory flat however long it runs.

Writes `<out>/faults_report.json` (one account per fault, the final account, the memory samples),
`<out>/memory.png`, and prints a table per fault kind.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # several torch processes share few cores

from mmupt.config import load_settings  # noqa: E402
from mmupt.faults import FAULTS, run_faults  # noqa: E402
from mmupt.model import build_tiny  # noqa: E402
from mmupt.shapes_task import write_dataset  # noqa: E402


def settings_for(out: Path, args) -> object:
    model, data = out / "tiny", out / "shapes"
    if not (model / "config.json").is_file():
        build_tiny(model)
    if not (data / "train.jsonl").is_file():
        write_dataset(data, train_size=64, eval_size=16, seed=0)
    return load_settings(environ={}, overrides={
        "run_id": f"bench-faults-{time.strftime('%Y%m%d-%H%M%S')}",
        "model": {"path": str(model), "device": "cpu"},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "test.jsonl")},
        "rollout": {"group_size": 4, "max_new_tokens": args.max_new_tokens},
        "streams": {"claim_idle_ms": 3000, "max_len": args.max_len},
        "learner": {"batch_groups": 2, "micro_groups": 1, "max_steps": 1_000_000, "lr": 1e-3,
                    "checkpoint_every": 1, "keep_checkpoints": 1_000_000, "push_timeout_s": 20.0},
        "shutdown_grace_s": 10.0,
        "auth": {"token": "bench-token"},
    })


def summarise(report: dict) -> list[dict]:
    by_kind = defaultdict(list)
    for fault in report["faults"]:
        by_kind[fault["fault"]].append(fault)
    rows = []
    for kind, faults in by_kind.items():
        rows.append({
            "fault": kind, "injected": len(faults),
            "lost": sum(len(f["lost"]) for f in faults),
            "trained_twice": sum(len(f["trained_twice"]) for f in faults),
            "balanced": all(f["balanced"] for f in faults),
            "duplicates_recognised": faults[-1]["duplicates"],
            "deadlettered": faults[-1]["deadlettered"],
            "recovery_s_max": max(f["recovery_seconds"] for f in faults),
            "exit_s_max": max((f.get("exit_seconds", 0.0) for f in faults), default=0.0),
        })
    return rows


def plot_memory(samples: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    t = [s["t"] for s in samples]
    top.plot(t, [s["used_memory"] / 2**20 for s in samples], marker=".")
    top.set_ylabel("Redis used_memory (MiB)")
    for name in ("prompts", "groups", "scored", "deadletter"):
        bottom.plot(t, [s.get(name, 0) for s in samples], label=name)
    bottom.set_ylabel("stream length")
    bottom.set_xlabel("seconds")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps-between", type=int, default=4)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--memory-every", type=float, default=2.0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=64, help="streams.max_len (the back-pressure cap)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-faults")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = [k.strip() for k in args.faults.split(",") if k.strip()]
    rng = random.Random(args.seed)
    schedule = [kind for _ in range(args.rounds) for kind in rng.sample(kinds, len(kinds))]
    run_dir = out / "run"
    report = run_faults(settings_for(out, args), run_dir, schedule, args.steps_between, args.memory_every)
    report["summary"] = summarise(report)
    memory = [s["used_memory"] for s in report.get("memory", [])]
    if memory:
        half = memory[len(memory) // 2:]
        report["memory_summary"] = {"samples": len(memory), "first_mib": round(memory[0] / 2**20, 2),
                                    "max_mib": round(max(memory) / 2**20, 2),
                                    "last_mib": round(memory[-1] / 2**20, 2),
                                    "second_half_range_mib": round((max(half) - min(half)) / 2**20, 2)}
        plot_memory(report["memory"], out / "memory.png")
    (out / "faults_report.json").write_text(json.dumps(report, indent=2))
    print(f"{'fault':<18}{'injected':>9}{'lost':>6}{'twice':>7}{'balanced':>10}{'recovery s':>12}{'exit s':>8}")
    for row in report["summary"]:
        print(f"{row['fault']:<18}{row['injected']:>9}{row['lost']:>6}{row['trained_twice']:>7}"
              f"{str(row['balanced']):>10}{row['recovery_s_max']:>12.1f}{row['exit_s_max']:>8.1f}")
    final = report["final"]
    print(f"final: steps {final['step']}, admitted {final['admitted']} = trained {final['trained']} + stale "
          f"{final['dropped_stale']} + vote {final['dropped_vote']} + skipped {final['skipped_zero_advantage']} + "
          f"dead-lettered {final['deadlettered']} + in flight {final['in_flight']}; lost {len(final['lost'])}, "
          f"trained twice {len(final['trained_twice'])}, duplicates recognised {final['duplicates']}")
    print(f"memory: {report.get('memory_summary')}; wall {report['wall_seconds']} s; report {out / 'faults_report.json'}")
    ok = (not final["lost"] and not final["trained_twice"] and final["in_flight"] == 0
          and all(r["lost"] == 0 and r["trained_twice"] == 0 and r["balanced"] for r in report["summary"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
