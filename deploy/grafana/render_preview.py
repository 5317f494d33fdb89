"""Render the Grafana dashboards as PNGs from real metrics, without Grafana.

Runs `mmupt run` on the tiny default, scrapes its services with a real Prometheus server (Debian's
`prometheus` package; the alert rules are loaded too), then evaluates every panel's query over the
run with Prometheus's HTTP API and draws the panels where the dashboard puts them (matplotlib).

    python deploy/grafana/render_preview.py --steps 60 --out deploy/grafana/preview

Prints which panels returned no data and which alerts fired, and writes one PNG per dashboard.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from mmupt.embedded_redis import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCRAPE_S = 2
RATE_INTERVAL = f"{4 * SCRAPE_S}s"  # what Grafana's $__rate_interval becomes at this scrape interval


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"mmupt run ended or stalled before writing {path}")
        time.sleep(0.2)


def start_prometheus(ports: dict[str, int], work: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("needs a Prometheus server: apt-get install prometheus")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "rule_files": [str(ROOT / "deploy" / "prometheus" / "rules" / "*.yml")],
        "scrape_configs": [{"job_name": f"mmupt-{name}", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                           for name, port in ports.items()],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"Prometheus did not start: {(work / 'prometheus.log').read_text()[-2000:]}")


def query_range(url: str, expr: str, start: float, end: float) -> list[dict]:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    reply = httpx.get(f"{url}/api/v1/query_range", params={"query": expr, "start": start, "end": end,
                                                          "step": SCRAPE_S}, timeout=30).json()
    if reply["status"] != "success":
        raise SystemExit(f"query failed: {expr}: {reply}")
    return reply["data"]["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    if not template or template == "__auto":
        return ",".join(f"{k}={v}" for k, v in labels.items() if k not in ("job", "instance")) or "value"
    for key, value in labels.items():
        template = template.replace("{{" + key + "}}", value)
    return template


def draw(board: dict, series: dict[int, list[tuple[str, list[dict]]]], start: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    fig = plt.figure(figsize=(16, rows * 0.42), facecolor="#111217")
    fig.suptitle(board["title"], color="white", x=0.01, ha="left", fontsize=13)
    for panel in board["panels"]:
        g = panel["gridPos"]
        # Room on the left of each panel for its y tick labels, above it for its title.
        ax = fig.add_axes([g["x"] / 24 + 0.035, 1 - (g["y"] + g["h"]) / rows * 0.95 - 0.02,
                           g["w"] / 24 - 0.045, g["h"] / rows * 0.95 - 0.035], facecolor="#181b1f")
        ax.set_title(panel["title"], color="#ccccdc", fontsize=9, loc="left")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        results = series[panel["id"]]
        if panel["type"] == "stat":
            ax.set_xticks([]), ax.set_yticks([])
            values = [float(r["values"][-1][1]) for _, rs in results for r in rs if r["values"]]
            text = f"{values[0]:.3g}" if values else "No data"
            ax.text(0.5, 0.4, text, color="#73bf69", fontsize=22, ha="center", va="center", transform=ax.transAxes)
            continue
        drawn = 0
        for template, rs in results:
            for r in rs:
                xs = [float(t) - start for t, _ in r["values"]]
                ys = [float(v) for _, v in r["values"]]
                ax.plot(xs, ys, linewidth=1.2, label=legend(template, r["metric"]))
                drawn += 1
        if drawn:
            ax.legend(fontsize=6, loc="upper left", facecolor="#181b1f", labelcolor="#ccccdc", edgecolor="#2c3235")
            ax.set_xlabel("seconds into the run", color="#8e8e8e", fontsize=7)
        else:
            ax.text(0.5, 0.5, "No data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(out, dpi=90, facecolor=fig.get_facecolor())
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of the tiny run")
    parser.add_argument("--out", default=str(HERE / "preview"), help="folder for the PNGs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="mmupt-preview-"))
    run_dir = work / "run"
    run = subprocess.Popen([sys.executable, "-m", "mmupt", "run", "--max-steps", str(args.steps), "--out", str(run_dir)],
                           cwd=ROOT, stdout=open(work / "run.log", "wb"), stderr=subprocess.STDOUT)
    prometheus = None
    try:
        wait_for(run_dir / "config.yaml", run)
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
        ports = {name: resolved[name]["http_port"] for name in ("rollout", "voter", "learner")}
        prometheus, url = start_prometheus(ports, work)
        start = time.time()
        print(f"run in {run_dir}, Prometheus at {url}; waiting for {args.steps} steps", flush=True)
        if run.wait() != 0:
            raise SystemExit(f"mmupt run failed: {(work / 'run.log').read_text()[-3000:]}")
        end = time.time()
        time.sleep(2 * SCRAPE_S)  # let the last rule evaluation happen
        fired = httpx.get(f"{url}/api/v1/query", params={"query": "ALERTS", "time": end}, timeout=30).json()
        names = sorted({(a["metric"]["alertname"], a["metric"]["alertstate"]) for a in fired["data"]["result"]})
        print("alerts pending/firing at the end:", names or "none")
        for path in sorted((HERE / "dashboards").glob("*.json")):
            board = json.loads(path.read_text())
            series = {p["id"]: [(t.get("legendFormat", ""), query_range(url, t["expr"], start, end)) for t in p["targets"]]
                      for p in board["panels"]}
            empty = [p["title"] for p in board["panels"] if not any(rs for _, rs in series[p["id"]])]
            draw(board, series, start, out / f"{board['uid']}.png")
            print(f"{out / (board['uid'] + '.png')}: {len(board['panels'])} panels, no data: {empty or 'none'}")
    finally:
        if run.poll() is None:
            run.terminate()
            run.wait(timeout=60)
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
