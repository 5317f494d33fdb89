"""Voter throughput and per-group latency on realistic groups, one CPU core.

    .venv/bin/python bench/voter.py [--groups 2000] [--grader mathruler] [--out runs/bench-voter]

Groups of G=10 responses of a few hundred tokens of reasoning each, ending in a boxed final answer of
a mixed type (integers, decimals, fractions written several equivalent ways, radicals, multiples of
pi, tuples and intervals, polynomials, words, multiple choice with options), with a majority share
drawn per group, wrong answers, and ~5% responses without an answer (no box, or truncated). Every
group draws fresh numbers, so caches help only as much as they would in training.

Phase 1 measures responses/s and p50/p99/max latency per group. Phase 2 puts one hostile answer
(an expression sympy cannot finish, e.g. `99999999!` or `\\boxed{9^{9^{9^{9}}}}`) in each group and
checks that no group takes longer than `compare_timeout_s` plus a small margin. The process and its
symbolic worker are pinned to one core. Prints a table; writes a latency histogram PNG to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from math import gcd
from pathlib import Path

from mmupt.services.voter.grading import make_grader
from mmupt.services.voter.vote import VotePolicy, vote

G = 10
WORDS = ("we", "the", "triangle", "angle", "so", "therefore", "area", "side", "since", "equal", "sum", "of",
         "let", "be", "then", "value", "circle", "radius", "point", "line", "by", "substituting", "gives")
HOSTILE = ("99999999!", "\\sqrt{99999999!}", "10**10**10", "9^{9^{9^{9}}}", "\\frac{99999999!}{3}")


def reasoning(rng: random.Random, tokens: int) -> str:
    """Plausible-looking step-by-step text with inline LaTeX, about `tokens` tokens long."""
    parts = []
    while len(parts) < tokens:
        if rng.random() < 0.15:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            parts.append(rng.choice([f"$\\frac{{{a}}}{{{b}}}$", f"$x^{{{a % 5 + 2}}} + {b}$", f"$\\angle ABC = {a}^\\circ$",
                                     f"$\\sqrt{{{a}}}$", f"${a} \\times {b} = {a * b}$"]))
        else:
            parts.append(rng.choice(WORDS))
        if rng.random() < 0.08:
            parts.append(".\n")
    return " ".join(parts)


def answer_family(rng: random.Random) -> tuple[list[str], list[str], list[str] | None]:
    """(equivalent ways to write the right answer, wrong answers, options or None)."""
    kind = rng.choice(["int", "int", "int", "decimal", "fraction", "radical", "pi", "tuple", "interval", "poly",
                       "word", "choice", "choice"])
    if kind == "int":
        n = rng.randint(0, 2000)
        return [str(n), str(n), f"{n}^\\circ" if n < 360 else f"{n}.0"], [str(n + d) for d in (1, -1, 10, 2)], None
    if kind == "decimal":
        x = rng.randint(1, 9999) / 100
        return [f"{x:g}", f"{x:.2f}", f"{x:g}\\text{{ cm}}"], [f"{x + 0.5:g}", f"{x * 2:g}", f"{x / 10:g}"], None
    if kind == "fraction":
        q = rng.choice([2, 3, 4, 5, 7, 8, 9, 11, 12])
        p = rng.choice([k for k in range(1, 3 * q) if gcd(k, q) == 1])
        forms = [f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{p}}}{{{q}}}", f"{p}/{q}"]
        if q in (2, 4, 5, 8):
            forms.append(f"{p / q:g}")
        return forms, [f"\\frac{{{p + 1}}}{{{q}}}", f"\\frac{{{q}}}{{{p}}}", f"\\frac{{{2 * p}}}{{{2 * q}}}"], None
    if kind == "radical":
        a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7])
        return ([f"{a}\\sqrt{{{b}}}", f"{a}\\sqrt{b}", f"\\sqrt{{{a * a * b}}}"],
                [f"{a + 1}\\sqrt{{{b}}}", f"\\sqrt{{{a * b}}}", f"{a * b}"], None)
    if kind == "pi":
        k = rng.randint(2, 40)
        return [f"{k}\\pi", f"{k} \\pi", f"\\pi \\cdot {k}"], [f"{k + 2}\\pi", f"{2 * k}\\pi", f"{k}"], None
    if kind == "tuple":
        a, b = rng.randint(-9, 9), rng.randint(-9, 9)
        return [f"({a}, {b})", f"({a},{b})", f"\\left( {a}, {b} \\right)"], [f"({b}, {a + 1})", f"({a}, {b + 1})"], None
    if kind == "interval":
        a, b = rng.randint(-9, 0), rng.randint(1, 9)
        return [f"[{a}, {b})", f"[{a},{b})"], [f"({a}, {b})", f"[{a}, {b}]"], None
    if kind == "poly":
        a = rng.randint(1, 9)
        return ([f"x^2 + {2 * a}x + {a * a}", f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}"],
                [f"x^2 + {a}x + {a * a}", f"(x-{a})^2"], None)
    if kind == "word":
        right, *wrong = rng.sample(["blue", "red", "green", "yellow", "circle", "square"], 4)
        return [right, f"\\text{{{right}}}", right.capitalize()], wrong, None
    options = [f"{rng.randint(1, 90)} cm" for _ in range(4)]
    i = rng.randrange(4)
    letter = "ABCD"[i]
    wrong = ["ABCD"[j] for j in range(4) if j != i]
    return [letter, f"({letter})", f"({letter}) {options[i]}", options[i]], wrong, options


def make_group(rng: random.Random, hostile: bool = False) -> tuple[list[str], str, list[str] | None]:
    right, wrong, options = answer_family(rng)
    share = rng.choice([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    responses = []
    for i in range(G):
        text = reasoning(rng, rng.randint(150, 400))
        roll = rng.random()
        if roll < 0.05:
            responses.append(text if rng.random() < 0.5 else text + " so the answer is \\boxed{" + right[0])
            continue
        # most responses that agree write the answer the same way; some use an equivalent form
        answer = (right[0] if rng.random() < 0.7 else rng.choice(right)) if rng.random() < share else rng.choice(wrong)
        responses.append(f"{text}\nTherefore, the final answer is $\\boxed{{{answer}}}$.")
    if hostile:
        responses[rng.randrange(G)] = reasoning(rng, 200) + "\\boxed{" + rng.choice(HOSTILE) + "}"
    return responses, right[0], options


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_phase(grader, groups, policy) -> tuple[list[float], int]:
    latencies, timeouts = [], 0
    started = time.monotonic()
    for i, (responses, answer, options) in enumerate(groups):
        t = time.perf_counter()
        result = vote(responses, grader, hidden_answer=answer, options=options, policy=policy, key=str(i))
        latencies.append(time.perf_counter() - t)
        timeouts += result.compare_timeouts
        if (i + 1) % 500 == 0:
            rate = (i + 1) / (time.monotonic() - started)
            print(f"  {i + 1}/{len(groups)} groups, {rate * G:.0f} responses/s, "
                  f"ETA {(len(groups) - i - 1) / rate:.0f}s", file=sys.stderr)
    return latencies, timeouts


def plot(latencies: list[float], hostile: list[float], bound: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    ms = [x * 1000 for x in latencies]
    hostile_ms = [x * 1000 for x in hostile]
    bins = np.logspace(np.log10(min(ms + hostile_ms)), np.log10(max(ms + hostile_ms + [bound * 1000])), 60)
    ax.hist(ms, bins=bins, color="tab:blue", alpha=0.8, label=f"realistic groups (n={len(ms)})")
    if hostile:
        ax.hist(hostile_ms, bins=bins, color="tab:red", alpha=0.8, label=f"with a hostile answer (n={len(hostile)})")
    for q, style in ((0.5, "--"), (0.99, ":")):
        ax.axvline(percentile(latencies, q) * 1000, color="k", linestyle=style, label=f"p{int(q * 100)}")
    ax.axvline(bound * 1000, color="tab:red", linestyle="-", label="compare_timeout_s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latency per group of 10 (ms)")
    ax.set_ylabel("groups")
    ax.set_title("mmupt voter, one CPU core")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=2000)
    parser.add_argument("--hostile-groups", type=int, default=20)
    parser.add_argument("--grader", default="mathruler", choices=["mathruler", "math_verify", "exact"])
    parser.add_argument("--compare-timeout-s", type=float, default=1.0)
    parser.add_argument("--margin-s", type=float, default=0.25, help="allowed latency above compare_timeout_s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-voter")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core; the worker inherits it
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(args.seed)
    groups = [make_group(rng) for _ in range(args.groups)]
    hostile_groups = [make_group(rng, hostile=True) for _ in range(args.hostile_groups)]
    chars = statistics.mean(len(r) for g, _, _ in groups for r in g)
    grader = make_grader(args.grader, args.compare_timeout_s)
    grader.start(wait=True)  # the symbolic workers have imported sympy, as in a running service
    policy = VotePolicy()
    print(f"voter bench: {args.groups} groups of {G}, {chars:.0f} chars (~{chars / 4:.0f} tokens) a response, "
          f"grader {args.grader}, compare_timeout_s {args.compare_timeout_s}, one core", file=sys.stderr)
    latencies, timeouts = run_phase(grader, groups, policy)
    hostile, hostile_timeouts = run_phase(grader, hostile_groups, policy) if hostile_groups else ([], 0)
    grader.close()

    total = sum(latencies)
    bound = args.compare_timeout_s + args.margin_s
    figures = {
        "grader": args.grader, "groups": len(groups), "responses": len(groups) * G,
        "responses_per_s": round(len(groups) * G / total, 1),
        "group_p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "group_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "group_max_ms": round(max(latencies) * 1000, 2),
        "compare_timeouts": timeouts,
        "hostile_groups": len(hostile), "hostile_compare_timeouts": hostile_timeouts,
        "hostile_max_ms": round(max(hostile) * 1000, 1) if hostile else None,
        "bound_ms": round(bound * 1000), "all_groups_within_bound": max(latencies + hostile) <= bound,
    }
    plot(latencies, hostile, args.compare_timeout_s, out / "voter_latency.png")
    (out / "voter.json").write_text(json.dumps(figures, indent=2))
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    print(f"plot: {out / 'voter_latency.png'}")
    return 0 if figures["all_groups_within_bound"] else 1


if __name__ == "__main__":
    sys.exit(main())
