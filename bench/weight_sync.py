"""Weight-sync throughput against the raw capacity of the link, in the same run.

    .venv/bin/python bench/weight_sync.py [--gb 1.0] [--rounds 3] [--wire-dtype bfloat16]

A receiver process (the real WeightSync service; its backend is a plain state dict of the same
shapes whose swap copies under a lock, as the transformers backend's load_state_dict does) and this
process (the learner side) measure, round after round, interleaved so that both see the same load:

  grpc ceiling   one flat buffer of the same size streamed as raw 256 KiB bytes messages (no protobuf)
  grpc push      WeightPusher.push of a transformer-shaped state dict: manifest, chunks, staging,
                 checksum verification, swap, acknowledgement
  gloo ceiling   one torch.distributed gloo broadcast of one flat buffer of the same size
  gloo push      CollectivePusher.push of the same state dict: Prepare, Receive, bucketed broadcast,
                 verification, swap, acknowledgement

"transfer" excludes the receiver's swap (a memory copy into the model, reported apart); "end to end"
includes it. The first push of each path pays the receiver's first-touch of its staging buffer and is
reported apart as "cold". Each push is bracketed by two ceiling measurements (their mean is its
ceiling), so that both see the same load on a shared machine; the ratio is taken per push, and the
figures are medians over the rounds.
Writes bench/results/weight_sync.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import torch

from mmupt.collective import BroadcastGroup, connect_store, start_store
from mmupt.services.learner.weight_push import CollectivePusher, WeightPusher
from mmupt.services.rollout.weight_server import MAX_MESSAGE_BYTES, WeightSyncServicer, start_server
from mmupt.weights import DTYPE_NAMES

TOKEN, RUN = "bench-token", "bench"
RAW_SINK, RAW_BROADCAST, RAW_CPU = "/bench.Raw/Sink", "/bench.Raw/Broadcast", "/bench.Raw/Cpu"
OUT = Path(__file__).parent / "results"


def transformer_state(total_bytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 tensors shaped like a small decoder (hidden 1024, MLP 2816, vocab 32000), ~total_bytes."""
    gen = torch.Generator().manual_seed(seed)
    hidden, mlp, vocab = 1024, 2816, 32000
    per_layer = 4 * (2 * hidden * hidden + 2 * (hidden // 4) * hidden + 3 * mlp * hidden)
    layers = max(1, round((total_bytes - 2 * 4 * vocab * hidden) / per_layer))
    state = {"embed_tokens.weight": torch.randn(vocab, hidden, generator=gen)}
    for layer in range(layers):
        p = f"layers.{layer}."
        for name, shape in (("q_proj.weight", (hidden, hidden)), ("q_proj.bias", (hidden,)),
                            ("k_proj.weight", (hidden // 4, hidden)), ("k_proj.bias", (hidden // 4,)),
                            ("v_proj.weight", (hidden // 4, hidden)), ("v_proj.bias", (hidden // 4,)),
                            ("o_proj.weight", (hidden, hidden)), ("gate_proj.weight", (mlp, hidden)),
                            ("up_proj.weight", (mlp, hidden)), ("down_proj.weight", (hidden, mlp)),
                            ("input_layernorm.weight", (hidden,)), ("post_attention_layernorm.weight", (hidden,))):
            state[p + name] = torch.randn(*shape, generator=gen)
    state["lm_head.weight"] = torch.randn(vocab, hidden, generator=gen)
    return state


class StateDictBackend:
    """The receiver's model: a state dict, swapped by copying under a lock (like load_state_dict)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self._version = 0
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return self._version

    def weight_specs(self):
        return {k: (tuple(v.shape), v.dtype) for k, v in self.state.items()}

    def state_dict(self):
        return self.state

    def swap_weights(self, state, version: int) -> bool:
        with self._lock:
            if version <= self._version:
                return False
            with torch.no_grad():
                for name, tensor in state.items():
                    self.state[name].copy_(tensor)
            self._version = version
            return True


# ---- receiver process ---------------------------------------------------------------------------
def serve(total_bytes: int) -> None:
    torch.set_num_threads(1)
    backend = StateDictBackend(transformer_state(total_bytes, seed=1))
    servicer = WeightSyncServicer(backend, TOKEN, RUN)
    sync_server, sync_port = start_server(servicer, "127.0.0.1", 0)
    flat = torch.ones(sum(t.nbytes for t in backend.state.values()), dtype=torch.uint8)  # touched once, reused
    raw_group: dict[str, BroadcastGroup] = {}

    def sink(requests, context):
        return str(sum(len(chunk) for chunk in requests)).encode()

    def broadcast(request, context):
        spec = json.loads(request)
        if "group" not in raw_group:
            store = connect_store("127.0.0.1", spec["port"], 60)
            raw_group["group"] = BroadcastGroup(store, "raw-ceiling", 1, 2, "gloo", 120)
        raw_group["group"].broadcast(flat[:spec["nbytes"]]).wait()
        return b"ok"

    identity = None  # bytes in, bytes out
    handler = grpc.method_handlers_generic_handler("bench.Raw", {
        "Sink": grpc.stream_unary_rpc_method_handler(sink, identity, identity),
        "Broadcast": grpc.unary_unary_rpc_method_handler(broadcast, identity, identity),
        "Cpu": grpc.unary_unary_rpc_method_handler(lambda r, c: str(time.process_time()).encode(), identity, identity),
    })
    raw_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
    raw_server.add_generic_rpc_handlers((handler,))
    raw_port = raw_server.add_insecure_port("127.0.0.1:0")
    raw_server.start()
    print(json.dumps({"sync": sync_port, "raw": raw_port}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    servicer.close()
    if "group" in raw_group:
        raw_group.pop("group").abort()
    sync_server.stop(0)
    raw_server.stop(0)


# ---- learner side -------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, ports: dict):
        self.args = args
        self.sync = f"127.0.0.1:{ports['sync']}"
        self.raw = grpc.insecure_channel(f"127.0.0.1:{ports['raw']}", options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self.state = transformer_state(int(args.gb * 1e9))
        self.nbytes = sum(t.nbytes for t in self.state.values())
        self.flat = torch.ones(self.nbytes, dtype=torch.uint8)
        self.grpc = WeightPusher(TOKEN, RUN, args.chunk_bytes, timeout_s=600, wire_dtype=args.wire_dtype)
        self.gloo = CollectivePusher(TOKEN, RUN, timeout_s=600, bucket_bytes=args.bucket_bytes, backend="gloo",
                                     wire_dtype=args.wire_dtype)
        self.ceiling_store = start_store(0, 60)
        self.ceiling_group: BroadcastGroup | None = None
        self.version = 0

    def close(self) -> None:
        self.grpc.close()
        self.gloo.close()
        if self.ceiling_group is not None:
            self.ceiling_group.abort()
            self.ceiling_group = None

    def grpc_ceiling(self) -> float:
        view, chunk = memoryview(self.flat.numpy()), self.args.chunk_bytes
        sink = self.raw.stream_unary(RAW_SINK)
        started = time.perf_counter()
        received = int(sink((bytes(view[o:o + chunk]) for o in range(0, self.nbytes, chunk)), timeout=600))
        assert received == self.nbytes
        return time.perf_counter() - started

    def gloo_ceiling(self) -> float:
        request = json.dumps({"port": self.ceiling_store.port, "nbytes": self.nbytes}).encode()
        started = time.perf_counter()
        reply = self.raw.unary_unary(RAW_BROADCAST).future(request, timeout=600)
        if self.ceiling_group is None:
            self.ceiling_group = BroadcastGroup(self.ceiling_store, "raw-ceiling", 0, 2, "gloo", 120)
            started = time.perf_counter()  # the rendezvous is not the link
        self.ceiling_group.broadcast(self.flat).wait()
        elapsed = time.perf_counter() - started
        assert reply.result() == b"ok"
        return elapsed

    def push(self, pusher) -> tuple[float, float]:
        self.version += 1
        started = time.perf_counter()
        [result] = pusher.push(self.state, self.version, [self.sync])
        elapsed = time.perf_counter() - started
        assert result.ok, result
        return elapsed, result.swap_seconds


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="state dict size in GB (fp32)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-bytes", type=int, default=256 * 1024)
    parser.add_argument("--bucket-bytes", type=int, default=256 * 1024 * 1024)
    parser.add_argument("--wire-dtype", choices=sorted(set(DTYPE_NAMES.values()) & {"bfloat16", "float16"}))
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    receiver = subprocess.Popen([sys.executable, __file__, "--serve", str(int(args.gb * 1e9))],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        bench = Bench(args, json.loads(receiver.stdout.readline()))
        run(bench, args)
        bench.close()
    finally:
        receiver.stdin.close()
        receiver.wait(timeout=60)


def run(bench: Bench, args) -> None:
    n = bench.nbytes
    print(f"state dict: {len(bench.state)} tensors, {n / 1e9:.3f} GB fp32; wire dtype {args.wire_dtype or 'float32'}; "
          f"chunk {args.chunk_bytes // 1024} KiB, bucket {args.bucket_bytes // 2**20} MiB; {os.cpu_count()} CPUs",
          flush=True)
    cold = {"grpc": bench.push(bench.grpc), "gloo": bench.push(bench.gloo)}
    print(f"cold first pushes (staging buffer first-touched): grpc {cold['grpc'][0]:.2f}s, gloo {cold['gloo'][0]:.2f}s",
          flush=True)
    rows = []
    started = time.monotonic()
    for r in range(args.rounds):
        row = {}
        for path, ceiling, pusher in (("grpc", bench.grpc_ceiling, bench.grpc), ("gloo", bench.gloo_ceiling, bench.gloo)):
            before = ceiling()
            row[f"{path}_push"], row[f"{path}_swap"] = bench.push(pusher)
            row[f"{path}_ceiling"] = (before + ceiling()) / 2  # bracketing the push: the same load
        rows.append(row)
        done = r + 1
        eta = (time.monotonic() - started) / done * (args.rounds - done)
        print(f"round {done}/{args.rounds}: " + ", ".join(
            f"{k} {gbps(n, v):.2f} GB/s" for k, v in row.items() if not k.endswith("swap"))
              + f" | ETA {eta:.0f}s", flush=True)
    report(rows, n, args, cold)


def report(rows: list[dict], n: int, args, cold: dict) -> None:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    out = {"bytes": n, "rounds": rows, "cold": cold, "args": {k: v for k, v in vars(args).items() if k != "serve"},
           "machine": f"{os.cpu_count()} CPUs"}
    lines = [f"{'path':<6} {'ceiling GB/s':>12} {'transfer GB/s':>13} {'ratio':>6} {'end-to-end GB/s':>15} {'ratio':>6} "
             f"{'swap s':>7}"]
    summary = {}
    for path in ("grpc", "gloo"):
        ceiling = [gbps(n, r[f"{path}_ceiling"]) for r in rows]
        transfer = [gbps(n, r[f"{path}_push"] - r[f"{path}_swap"]) for r in rows]
        e2e = [gbps(n, r[f"{path}_push"]) for r in rows]
        summary[path] = {
            "ceiling_gbps": med(ceiling), "transfer_gbps": med(transfer), "end_to_end_gbps": med(e2e),
            "transfer_ratio": med([t / c for t, c in zip(transfer, ceiling)]),
            "end_to_end_ratio": med([e / c for e, c in zip(e2e, ceiling)]),
            "swap_seconds": med([r[f"{path}_swap"] for r in rows]),
        }
        s = summary[path]
        lines.append(f"{path:<6} {s['ceiling_gbps']:>12.2f} {s['transfer_gbps']:>13.2f} {s['transfer_ratio']:>6.0%} "
                     f"{s['end_to_end_gbps']:>15.2f} {s['end_to_end_ratio']:>6.0%} {s['swap_seconds']:>7.2f}")
    out["summary"] = summary
    print("\n".join(lines))
    OUT.mkdir(exist_ok=True)
    tag = f"_{args.wire_dtype}" if args.wire_dtype else ""
    (OUT / f"weight_sync{tag}.json").write_text(json.dumps(out, indent=2))
    plot(summary, OUT / f"weight_sync{tag}.png", n, args)
    print(f"wrote {OUT / f'weight_sync{tag}.json'} and .png")


def plot(summary: dict, path: Path, n: int, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    kinds = [("ceiling_gbps", "raw ceiling"), ("transfer_gbps", "push, transfer"), ("end_to_end_gbps", "push, end to end")]
    width = 0.26
    for i, (key, label) in enumerate(kinds):
        values = [summary[p][key] for p in ("grpc", "gloo")]
        bars = ax.bar([x + (i - 1) * width for x in range(2)], values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(2), ["gRPC", "gloo broadcast"])
    ax.set_ylabel("GB/s (model state bytes)")
    ax.set_title(f"Weight sync, {n / 1e9:.2f} GB state dict, wire {args.wire_dtype or 'float32'} ({os.cpu_count()} CPUs)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
