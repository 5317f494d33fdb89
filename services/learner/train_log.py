"""One JSON line per optimizer step, and the curves people look at as a PNG."""
from __future__ import annotations

import json
from pathlib import Path

CURVES = ("loss", "mean_reward", "majority_ratio", "vote_entropy", "label_accuracy", "version_lag_max", "kl", "entropy",
          "clip_frac", "mismatch_kl", "grad_norm", "tokens_per_s")


class TrainLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, step: int) -> None:
        """Forget steps after `step`: a resumed learner trains them again (they were never committed)."""
        rows = self.rows()
        kept = [r for r in rows if r["step"] <= step]
        if len(kept) != len(rows):
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def plot(self, png: str | Path) -> Path | None:
        rows = self.rows()
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        curves = [c for c in CURVES if any(c in r for r in rows)]
        fig, axes = plt.subplots(len(curves), 1, figsize=(7, 1.8 * len(curves)), sharex=True, squeeze=False)
        for ax, name in zip(axes[:, 0], curves):
            points = [(r["step"], r[name]) for r in rows if name in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
            ax.set_ylabel(name, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("optimizer step")
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
        return Path(png)
