"""The filter report: where every generated question went (generated = kept + each filter's drops)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .filters import REASONS
from .pipeline import Candidate, SeedFailure

FILTERS = ("parse", "length", "dedup", "answerability", "image")


class AccountingError(RuntimeError):
    """The report does not account for every generated question (a bug, never bad input)."""


@dataclass
class SynthReport:
    mode: str
    model_version: str
    seeds: int = 0
    generated: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    checked: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    seeds_failed: list[dict] = field(default_factory=list)
    shares_kept: list[float] = field(default_factory=list)
    shares_dropped: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, seeds: int, candidates: list[Candidate], failures: list[SeedFailure]) -> None:
        self.seeds += seeds
        self.seeds_failed += [{"seed_id": f.seed_id, "reason": f.reason} for f in failures]
        for c in candidates:
            self.generated += 1
            if c.kept:
                self.kept += 1
            else:
                self.dropped[c.reason] += 1
            for name in c.checks:
                self.checked[name] += 1
            if c.majority_share is not None:
                (self.shares_kept if c.kept else self.shares_dropped).append(c.majority_share)
        self.check()

    def check(self) -> None:
        if self.generated != self.kept + sum(self.dropped.values()):
            raise AccountingError(f"generated {self.generated} != kept {self.kept} + dropped {self.dropped}")

    def line(self) -> str:
        drops = ", ".join(f"{name} {n}" for name, n in self.dropped.items() if n)
        return (f"{self.seeds} seeds, {self.generated} questions generated, {self.kept} kept"
                + (f"; dropped: {drops}" if drops else "")
                + (f"; {len(self.seeds_failed)} seeds failed" if self.seeds_failed else ""))

    def as_dict(self) -> dict:
        seconds = time.monotonic() - self.started
        shares = self.shares_kept + self.shares_dropped
        return {
            "mode": self.mode, "model_version": self.model_version,
            "seeds": self.seeds, "seeds_failed": self.seeds_failed,
            "generated": self.generated, "kept": self.kept, "dropped": dict(self.dropped),
            "accounted": self.generated == self.kept + sum(self.dropped.values()),
            "checked": dict(self.checked),
            "keep_rate": self.kept / self.generated if self.generated else None,
            "mean_majority_share": {
                "all": sum(shares) / len(shares) if shares else None,
                "kept": sum(self.shares_kept) / len(self.shares_kept) if self.shares_kept else None},
            "wall_seconds": round(seconds, 2),
            "questions_per_second": round(self.generated / seconds, 3) if seconds > 0 else None,
        }


def plot_report(report: SynthReport, path: Path, title: str) -> None:
    """Where the generated questions went, and the majority shares of the questions answered."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (funnel, shares) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = ["kept", *report.dropped]
    counts = [report.kept, *report.dropped.values()]
    funnel.barh(names[::-1], counts[::-1], color=["#888"] * len(report.dropped) + ["#2a7"])
    funnel.set_xlabel("questions")
    funnel.set_title(f"{report.generated} generated from {report.seeds} seeds", fontsize=10)
    for y, n in enumerate(counts[::-1]):
        funnel.text(n, y, f" {n}", va="center", fontsize=8)
    bins = [i / 10 for i in range(11)]
    shares.hist([report.shares_kept, report.shares_dropped], bins=bins, stacked=True, color=["#2a7", "#888"],
                label=["kept", "dropped"])
    if not report.shares_kept and not report.shares_dropped:
        shares.text(0.5, 0.5, "no question reached the answer checks", ha="center", va="center",
                    transform=shares.transAxes, fontsize=9)
    shares.set_xlabel("majority share of the sampled answers (with the image)")
    shares.set_ylabel("questions")
    shares.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
