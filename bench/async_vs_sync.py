"""Asynchronous vs synchronous training: optimizer steps per minute of the same components, one run.

Both modes run `mmupt run` (rollout, voter and learner as separate processes, an embedded Valkey):
- async (the default): rollouts of the next batches overlap the learner's step, bounded by
  learner.max_staleness;
- sync (`learner.async: false`): the learner admits a batch only after its previous step is taken
  and the weights pushed; rollouts wait for those weights. Generation and training never overlap.

The asynchronous design pays off when rollout and learning run on separate devices. To model that
on a CPU machine, rollout (with the voter) and learner are pinned to different cores (--pin, the
default when the machine has 2 or more) with one torch thread each; without pinning both fight for
the same cores and overlap can gain little. Rollout and learning time are balanced by the settings
(group size, new tokens, groups per step): a calibration first measures, on the same cores and
settings, the time to sample one rollout batch and the time of one learner step, and prints both.

Steps per minute are counted from each run's train log, between its first and last step (model
loading and start-up are left out, the same for both modes). The train log also gives the balance as it
was in the runs: the learner's step time, and how long it waited for each batch (in sync mode, the
rollout side's time per batch: admission, sampling, voting).

    python bench/async_vs_sync.py [--config configs/tiny-cpu.yaml] [--steps 20] [--group-size 32] \\
        [--max-new-tokens 128] [--batch-groups 2] [--max-staleness 2] [--rounds 2] [--no-pin] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # learner_step's helpers

from mmupt import run as run_module  # noqa: E402
from mmupt.config import Settings, load_settings  # noqa: E402
from mmupt.data import ensure_data, load_jsonl  # noqa: E402
from mmupt.model import ensure_model  # noqa: E402
from mmupt.services.learner.train_log import TrainLog  # noqa: E402


def pinning(pin: bool) -> dict[str, set[int]] | None:
    """Cores per service: rollout and voter on one, the learner on another (a model of two devices)."""
    cores = sorted(os.sched_getaffinity(0))
    if not pin or len(cores) < 2:
        return None
    return {"rollout": {cores[0]}, "voter": {cores[0]}, "learner": {cores[1]}}


class PinnedChildren(run_module.Children):
    """`mmupt run`'s children, each pinned to its cores with one torch thread (set before torch loads)."""
    cores: dict[str, set[int]] | None = None

    def start(self, name, config_path, env, args=()):
        if self.cores is None:
            return super().start(name, config_path, env, args)
        super().start(name, config_path, {**env, "OMP_NUM_THREADS": "1"}, args)
        os.sched_setaffinity(self.procs[name].pid, self.cores[name])  # still the interpreter's start-up


def bench_settings(args) -> Settings:
    overrides = {
        "rollout": {"group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "seed": 0},
        "learner": {"batch_groups": args.batch_groups, "micro_groups": args.batch_groups, "max_steps": args.steps,
                    "max_staleness": args.max_staleness, "updates_per_batch": 1, "checkpoint_every": 0},
    }
    overrides["evaluation"] = {"enabled": False}  # held-out evaluation is not what this measures
    return load_settings(args.config, environ={}, overrides=overrides)


def calibrate(settings: Settings, cores: dict[str, set[int]] | None, work: Path) -> dict[str, float]:
    """Seconds to sample one rollout batch and to take one learner step, each on its own cores."""
    import torch
    from learner_step import measure, sample_batch

    from mmupt.services.rollout.hf_backend import TransformersBackend

    rc, lc = settings.rollout, settings.learner
    before = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    try:
        if cores:
            torch.set_num_threads(1)
            os.sched_setaffinity(0, cores["rollout"])
        backend = TransformersBackend(settings.model)
        items = load_jsonl(settings.data.train)[:lc.batch_groups]
        sample_batch(settings, 1, rc.group_size, rc.max_new_tokens, backend, items)  # warm-up
        times = []
        for _ in range(3):
            started = time.perf_counter()
            sampled = sample_batch(settings, lc.batch_groups, rc.group_size, rc.max_new_tokens, backend, items)
            times.append(time.perf_counter() - started)
        if cores:
            os.sched_setaffinity(0, cores["learner"])
        learner = measure(settings, sampled, 5, work)
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)
    return {"rollout_batch_s": statistics.median(times), "learner_step_s": learner["step_s"],
            "weight_export_s": learner["export_s"]}


def run_mode(settings: Settings, asynchronous: bool, out: Path) -> dict:
    s = settings.model_copy(deep=True)
    s.learner.async_ = asynchronous
    s.run_id = f"bench-{'async' if asynchronous else 'sync'}-{os.getpid()}"
    summary = run_module.run(s, out, run_id=s.run_id)
    if summary["status"] != "finished":
        raise SystemExit(f"the {'async' if asynchronous else 'sync'} run did not finish: {summary['status']}")
    rows = TrainLog(out / "checkpoints" / "train_log.jsonl").rows()
    first, last = rows[0], rows[-1]
    minutes = (last["time"] - first["time"]) / 60
    return {"mode": "async" if asynchronous else "sync", "steps": summary["steps"],
            "steps_per_min": (last["step"] - first["step"]) / minutes,
            "learner_step_s": statistics.mean(r["step_seconds"] for r in rows[1:]),
            # Idle time per step, waiting for scored groups: in sync mode, the rollout side's time per batch.
            "learner_wait_s": statistics.mean(r["wait_seconds"] for r in rows[1:]),
            "mean_version_lag": statistics.mean(r["version_lag_max"] for r in rows),
            "groups_dropped_stale": summary["groups_dropped_stale"], "wall_s": summary["wall_seconds"],
            "step_times": [r["time"] - first["time"] for r in rows]}


def combine(runs: list[dict]) -> dict:
    """One mode's rounds: the median rate, the rest averaged; the median round's step times for the plot."""
    rates = [r["steps_per_min"] for r in runs]
    middle = sorted(runs, key=lambda r: r["steps_per_min"])[len(runs) // 2]
    return {"mode": runs[0]["mode"], "steps_per_min": statistics.median(rates), "rounds": rates,
            "learner_step_s": statistics.mean(r["learner_step_s"] for r in runs),
            "learner_wait_s": statistics.mean(r["learner_wait_s"] for r in runs),
            "mean_version_lag": statistics.mean(r["mean_version_lag"] for r in runs),
            "groups_dropped_stale": sum(r["groups_dropped_stale"] for r in runs), "step_times": middle["step_times"]}


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    left.bar([r["mode"] for r in results], [r["steps_per_min"] for r in results], color=["tab:blue", "tab:orange"])
    left.set_ylabel("optimizer steps / min")
    ratio = results[0]["steps_per_min"] / results[1]["steps_per_min"]
    left.set_title(f"async / sync = {ratio:.2f}x", fontsize=10)
    for r in results:
        right.plot(r["step_times"], range(1, len(r["step_times"]) + 1), marker=".", label=r["mode"])
    right.set_xlabel("seconds since the first step")
    right.set_ylabel("optimizer step")
    right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny-cpu.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="the default balances rollout and learner on the 2-core VM (see bench/README.md)")
    parser.add_argument("--batch-groups", type=int, default=2)
    parser.add_argument("--max-staleness", type=int, default=2, help="async mode's bound")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each mode, alternated")
    parser.add_argument("--no-pin", action="store_true", help="let every process use every core")
    parser.add_argument("--calibrate-only", action="store_true")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    settings = bench_settings(args)
    ensure_model(settings.model)
    ensure_data(settings.data)
    cores = pinning(not args.no_pin)
    PinnedChildren.cores = cores
    run_module.Children = PinnedChildren  # `mmupt run` starts its services through this class
    work = Path(tempfile.mkdtemp(prefix="mmupt-async-sync-"))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; pinning: "
          f"{({k: sorted(v) for k, v in cores.items()} if cores else 'none')}; "
          f"{args.batch_groups} groups x G={args.group_size} x {args.max_new_tokens} new tokens per step", flush=True)
    balance = calibrate(settings, cores, work)
    print(f"calibration: rollout batch {balance['rollout_batch_s']:.3f} s, learner step {balance['learner_step_s']:.3f} s "
          f"(ratio {balance['rollout_batch_s'] / balance['learner_step_s']:.2f}), weight export "
          f"{balance['weight_export_s'] * 1000:.0f} ms", flush=True)
    if args.calibrate_only:
        return
    # Alternate the modes: the load of other jobs on a shared machine drifts, and must not favour one.
    runs = [run_mode(settings, asynchronous, work / f"{'async' if asynchronous else 'sync'}-{i}")
            for i in range(args.rounds) for asynchronous in (True, False)]
    results = [combine([r for r in runs if r["mode"] == mode]) for mode in ("async", "sync")]
    ratio = results[0]["steps_per_min"] / results[1]["steps_per_min"]
    print("\n| mode | steps/min (per round) | learner step s | learner waits s/step | mean version lag | dropped stale |"
          "\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['steps_per_min']:.1f} ({', '.join(f'{x:.1f}' for x in r['rounds'])}) | "
              f"{r['learner_step_s']:.3f} | {r['learner_wait_s']:.3f} | {r['mean_version_lag']:.2f} | "
              f"{r['groups_dropped_stale']} |")
    print(f"\nasync / sync steps per minute: {ratio:.2f}x (target >= 1.7x on the balanced setting)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
              "pinning": {k: sorted(v) for k, v in cores.items()} if cores else None, "args": vars(args),
              "calibration": balance, "results": results, "async_over_sync": ratio}
    (out / "async_vs_sync.json").write_text(json.dumps(record, indent=2))
    plot(results, out / "async_vs_sync.png")
    print(f"wrote {out / 'async_vs_sync.json'} and {out / 'async_vs_sync.png'}")


if __name__ == "__main__":
    main()
