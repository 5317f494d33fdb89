"""Rollout benchmark: generation speed of the transformers backend, and the HTTP API under load.

    python bench/rollout.py [--model DIR] [--out runs/bench-rollout] [--quick]

1. Backend: generated tokens/s of `TransformersBackend.generate` on the tiny model (built offline
   when --model is not given) for group sizes G, one 112x112 image, up to 64 new tokens.
2. HTTP: the real API server in its own process; N concurrent clients each send chat completions
   (one image, n=4, up to 32 new tokens). Reports requests/s, generated tokens/s, latency
   percentiles and errors (there must be none). A last run with more clients than the queue holds
   shows the bounded queue refusing work with 429 + Retry-After instead of failing.

Prints a table, writes results.json and latency.png to --out.
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: on a shared 2-core machine the default (spinning) wait policy makes
# every small op up to ~100x slower whenever other processes compete for the cores (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import statistics
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mmupt.config import PromptSettings, load_settings  # noqa: E402
from mmupt.embedded_redis import free_port  # noqa: E402

log = logging.getLogger("bench.rollout")


def settings_for(model_dir: str, max_queue: int = 64):
    return load_settings(environ={}, overrides={
        "model": {"path": model_dir, "device": "cpu"}, "voter": {"grader": "exact"},
        "rollout": {"max_queue": max_queue, "max_batch_prompts": 4, "retry_after_s": 1, "max_new_tokens": 32}})


def image_bytes(side: int = 112) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 160, 40)).save(buf, format="PNG")
    return buf.getvalue()


# ---- 1. backend ---------------------------------------------------------------------------------------
def bench_backend(model_dir: str, groups: list[int], repeats: int) -> list[dict]:
    from PIL import Image

    from mmupt.model import build_messages, render_prompt
    from mmupt.services.rollout.backend import SamplingParams, prepare_prompt
    from mmupt.services.rollout.hf_backend import TransformersBackend

    backend = TransformersBackend(settings_for(model_dir).model)
    text = render_prompt(backend.processor, build_messages("Which shape is shown? <image>", 1, PromptSettings()))
    prompt = prepare_prompt(backend.processor, text, [Image.new("RGB", (112, 112), "red")], 2048)
    backend.generate([prompt], SamplingParams(n=2, max_new_tokens=8, seed=0))  # warm-up
    rows = []
    for g in groups:
        tokens, started = 0, time.perf_counter()
        for r in range(repeats):
            (group,) = backend.generate([prompt], SamplingParams(n=g, temperature=1.0, max_new_tokens=64, seed=r))
            tokens += sum(len(c.token_ids) for c in group.completions)
        seconds = time.perf_counter() - started
        rows.append({"group_size": g, "groups": repeats, "tokens": tokens, "seconds": round(seconds, 3),
                     "tokens_per_s": round(tokens / seconds, 1), "groups_per_s": round(repeats / seconds, 2)})
        log.info("backend G=%d: %.0f tokens/s", g, tokens / seconds)
    return rows


# ---- 2. HTTP ------------------------------------------------------------------------------------------
def serve(model_dir: str, port: int, max_queue: int) -> None:
    """The API server alone (no Redis, no gRPC): what the benchmark's clients talk to."""
    import uvicorn

    from mmupt.services.rollout.api import RolloutServer, build_app
    from mmupt.services.rollout.hf_backend import TransformersBackend

    settings = settings_for(model_dir, max_queue)
    server = RolloutServer(settings, token=None)
    server.attach(TransformersBackend(settings.model))
    uvicorn.run(build_app(server), host="127.0.0.1", port=port, log_level="warning")


def start_server(model_dir: str, max_queue: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--model", model_dir,
                             "--max-queue", str(max_queue)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the API server did not become ready")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load_run(url: str, clients: int, per_client: int) -> dict:
    from mmupt.sampler import image_part

    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Which shape is shown?"},
                                                       image_part(image_bytes())]}],
            "n": 4, "max_tokens": 32, "temperature": 1.0}
    latencies, statuses, tokens, lock = [], {}, [0], threading.Lock()

    def client():
        with httpx.Client(base_url=url, timeout=300) as http:
            for _ in range(per_client):
                started = time.perf_counter()
                try:
                    reply = http.post("/v1/chat/completions", json=body)
                    status = reply.status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(time.perf_counter() - started)
                        tokens[0] += reply.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    ok = statuses.get(200, 0)
    row = {"clients": clients, "requests": clients * per_client, "ok": ok,
           "statuses": {str(k): v for k, v in statuses.items()},
           "errors": sum(v for k, v in statuses.items() if k not in (200, 429)), "refused_429": statuses.get(429, 0),
           "seconds": round(seconds, 2), "requests_per_s": round(ok / seconds, 2),
           "tokens_per_s": round(tokens[0] / seconds, 1)}
    if latencies:
        row.update({f"p{int(q * 100)}_s": round(percentile(latencies, q), 3) for q in (0.5, 0.9, 0.99)})
        row["mean_s"] = round(statistics.mean(latencies), 3)
    log.info("HTTP %d clients: %s", clients, row)
    return row


def bench_http(model_dir: str, concurrency: list[int], per_client: int) -> tuple[list[dict], dict]:
    proc, url = start_server(model_dir, max_queue=64)
    try:
        load_run(url, 1, 2)  # warm-up
        rows = [load_run(url, n, per_client) for n in concurrency]
    finally:
        proc.terminate()
        proc.wait(30)
    proc, url = start_server(model_dir, max_queue=2)  # overload: more clients than the queue holds
    try:
        overload = load_run(url, 12, 2)
    finally:
        proc.terminate()
        proc.wait(30)
    return rows, overload


# ---- report -------------------------------------------------------------------------------------------
def report(result: dict, out: Path) -> None:
    print("\nBackend (transformers, tiny Qwen2.5-VL, one 112x112 image, up to 64 new tokens)")
    print(f"{'G':>4} {'groups':>7} {'tokens':>7} {'tokens/s':>9} {'groups/s':>9}")
    for r in result["backend"]:
        print(f"{r['group_size']:>4} {r['groups']:>7} {r['tokens']:>7} {r['tokens_per_s']:>9} {r['groups_per_s']:>9}")
    print("\nHTTP /v1/chat/completions (n=4, up to 32 new tokens, one image)")
    print(f"{'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>6} {'tok/s':>7} "
          f"{'p50 s':>6} {'p90 s':>6} {'p99 s':>6}")
    for r in result["http"]:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['requests_per_s']:>6} {r['tokens_per_s']:>7} "
              f"{r.get('p50_s', '-'):>6} {r.get('p90_s', '-'):>6} {r.get('p99_s', '-'):>6}")
    o = result["overload"]
    print(f"\nOverload (12 clients, max_queue=2): {o['ok']} answered, {o['refused_429']} refused with 429, "
          f"{o['errors']} errors")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["clients"] for r in result["http"]]
    for q in ("p50_s", "p90_s", "p99_s"):
        left.plot(xs, [r[q] for r in result["http"]], marker="o", label=q[:-2])
    left.set_xlabel("concurrent clients")
    left.set_ylabel("latency (s)")
    left.set_title("HTTP latency")
    left.legend()
    sizes = [r["group_size"] for r in result["backend"]]
    right.bar(range(len(sizes)), [r["tokens_per_s"] for r in result["backend"]], tick_label=[str(g) for g in sizes])
    right.set_xlabel("group size G")
    right.set_ylabel("generated tokens/s")
    right.set_title("transformers backend")
    fig.suptitle(result["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    print(f"\nresults: {out / 'results.json'}  plot: {out / 'latency.png'}")


def machine() -> str:
    import platform

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} cores, load average {load} at start, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: build the tiny model)")
    parser.add_argument("--out", default="runs/bench-rollout")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-queue", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.serve is not None:
        serve(args.model, args.serve, args.max_queue)
        return 0
    model_dir = args.model
    if model_dir is None:
        from mmupt.model import build_tiny

        model_dir = str(build_tiny(Path(tempfile.mkdtemp(prefix="mmupt-bench-")) / "tiny"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repeats, per_client = (4, 3) if args.quick else (20, 8)
    result = {"machine": machine(), "model": model_dir,
              "backend": bench_backend(model_dir, [1, 4, 8, 16], repeats)}
    result["http"], result["overload"] = bench_http(model_dir, [1, 4, 16], per_client)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    report(result, out)
    return 1 if any(r["errors"] for r in result["http"]) or result["overload"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
