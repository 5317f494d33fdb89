#!/usr/bin/env python
"""GPU figures for the production path (issue 11), measured on the project's own code paths.

For a randomly initialised, full-size Qwen2.5-VL (3B, and 7B where the plan says one GPU can hold it):

- learner: tokens/s and MFU of GRPO steps (policy forward+backward, reference forward) through
  `PolicyEngine` under DeepSpeed on one GPU, on synthetic micro-batches of one image and a response;
- generate: tokens/s of the transformers rollout backend (`TransformersBackend`), G samples per prompt;
- grpc_push: the weight-sync path: the full state dict pushed from the GPU over gRPC (`WeightPusher`)
  to a real `mmupt rollout` process, which stages, verifies and swaps it into its GPU model; checked
  against the server's reported version and checksum;
- broadcast: the collective transport ceiling, a raw torch.distributed broadcast of the state dict's
  bytes in 512 MiB buckets between two processes (NCCL on two GPUs, gloo on the CPU).

Every part runs in its own process (CUDA memory and DeepSpeed's process group start clean).

    python bench/gpu.py                          # GPU machine: 3B, then 7B
    python bench/gpu.py --model 7b --parts learner
    python bench/gpu.py --tiny --device cpu      # check this script on the CPU with the tiny model

Without CUDA it stops with an error unless `--device cpu` is given. Figures go to stdout, and to
`--out` as gpu.json and gpu.png; copy them with the GPU name and date into bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

PARTS = ("learner", "generate", "grpc_push", "broadcast")
BUCKET_BYTES = 512 * 2**20
GiB = 2**30
# Dense bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s (first matching name wins).
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("GH200", 989.4), ("A100", 312.0), ("L40S", 362.0)]


# ---- settings shared by the parts ---------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["3b", "7b", "all"], default="all",
                    help="full-size architecture(s), randomly initialised (default: 3b then 7b)")
    ap.add_argument("--tiny", action="store_true", help="the tiny offline model instead (a quick check)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", default="runs/bench-gpu", help="folder for gpu.json and gpu.png")
    ap.add_argument("--workdir", default=".cache/bench-gpu", help="where random model folders are kept and reused")
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=2)
    ap.add_argument("--sequences", type=int, default=1, help="sequences per learner micro-batch")
    ap.add_argument("--response-tokens", type=int, default=512, help="response tokens per learner sequence")
    ap.add_argument("--image-side", type=int, default=512,
                    help="image side in pixels (512: 361 image tokens after Qwen's resize; tiny: 112)")
    ap.add_argument("--steps", type=int, default=3, help="timed learner steps (after one warm-up step)")
    ap.add_argument("--group-size", type=int, default=10, help="samples per prompt when generating")
    ap.add_argument("--gen-prompts", type=int, default=3, help="timed prompts (groups) when generating")
    ap.add_argument("--gen-tokens", type=int, default=256, help="max new tokens per sample when generating")
    ap.add_argument("--pushes", type=int, default=2, help="timed gRPC pushes (versions 1..N)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: by GPU name)")
    ap.add_argument("--force", action="store_true", help="run the learner even where the estimate says it cannot fit")
    ap.add_argument("--part-timeout", type=float, default=1800.0, help="seconds before a part is stopped")
    ap.add_argument("--part", help=argparse.SUPPRESS)      # internal: run one part in this process
    ap.add_argument("--size", help=argparse.SUPPRESS)      # internal: the model size of that part
    ap.add_argument("--result", help=argparse.SUPPRESS)    # internal: where that part writes its JSON
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.tiny and args.image_side == ap.get_default("image_side"):
        args.image_side = 112
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    return args


def sizes(args) -> list[str]:
    if args.tiny:
        return ["tiny"]
    return ["3b", "7b"] if args.model == "all" else [args.model]


def model_settings(args, folder: Path):
    from mmupt.config import ModelSettings

    dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.size == "tiny":
        return ModelSettings(path=str(folder), dtype=dtype, device=args.device, min_pixels=56 * 56,
                             max_pixels=112 * 112)
    return ModelSettings(path=str(folder), dtype=dtype, device=args.device, min_pixels=512 * 512,
                         max_pixels=1536 * 28 * 28)  # the recipe's bounds


def model_folder(args) -> Path:
    """The tiny model, or a full-size Qwen2.5-VL with random weights (built once, then reused)."""
    from mmupt.model import build_tiny

    work = Path(args.workdir)
    if args.size == "tiny":
        folder = work / "tiny"
        return folder if (folder / "config.json").is_file() else build_tiny(folder)
    folder = work / f"qwen2_5_vl_{args.size}-random"
    if (folder / "model.safetensors.index.json").is_file() or (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from mmupt.architectures import public_config

    # The offline tokenizer and processor of the tiny model; the network is the public full-size one,
    # with the vision/special token ids of this tokenizer (ids past its vocabulary decode to nothing).
    processor = AutoProcessor.from_pretrained(build_tiny(work / "tokenizer"))
    tok = processor.tokenizer
    ids = {"bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"), "eos_token_id": tok.eos_token_id,
           "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
           "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
           "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
           "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>")}
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(public_config(args.size, ids), dtype=torch.bfloat16)
    log(f"initialised a random {args.size} model in {time.perf_counter() - started:.0f}s; saving to {folder}")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def log(message: str) -> None:
    print(f"[bench/gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def random_image(side: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def prompt_text(processor) -> str:
    from mmupt.config import PromptSettings
    from mmupt.model import build_messages, render_prompt

    return render_prompt(processor, build_messages("<image>What is the area of the shaded region?", 1,
                                                   PromptSettings()))


# ---- learner ------------------------------------------------------------------------------------
def synthetic_batch(args, processor, config):
    """One micro-batch: `sequences` copies of an image prompt, each with a random response."""
    import torch

    from mmupt.model import banned_token_ids, encode_prompt
    from mmupt.services.learner.batch import MicroBatch

    enc = encode_prompt(processor, prompt_text(processor), [random_image(args.image_side)])
    prompt = enc["input_ids"][0]
    n, r = args.sequences, args.response_tokens
    vocab = config.text_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    responses = torch.randint(0, vocab, (n, r), generator=generator)
    banned = set(banned_token_ids(processor.tokenizer)) | {config.image_token_id, config.video_token_id,
                                                           config.vision_start_token_id, config.vision_end_token_id}
    safe = min(set(range(len(banned) + 1)) - banned)
    responses[torch.isin(responses, torch.tensor(sorted(banned)))] = safe  # vision tokens would break the forward
    input_ids = torch.cat([prompt.expand(n, -1), responses], dim=1)
    # Only the response positions are scored: they start at the last prompt token (it predicts the first).
    first = len(prompt) - 1
    mask = torch.ones(n, r)
    rewards = torch.tensor([float(i % 2) for i in range(n)])
    return MicroBatch(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        pixel_values=enc["pixel_values"].repeat(n, 1), image_grid_thw=enc["image_grid_thw"].repeat(n, 1),
        first=first, targets=input_ids[:, first + 1:], mask=mask,
        behaviour_logp=-math.log(vocab) * mask,  # a uniform policy's log-prob
        advantages=rewards * 2 - 1, rewards=rewards, n_groups=1)


def forward_flops(arch, batch) -> float:
    """PaLM-style model FLOPs of one forward pass: 2 x matmul weights per token plus attention
    (4 x hidden x context per token and layer), for the language model and the vision tower."""
    n, length = batch.input_ids.shape
    text = n * length * (2 * arch.language_matmul_params + 4 * arch.layers * arch.hidden_size * length)
    patches_per_image = int(batch.image_grid_thw[0].prod())
    window = (112 // 14) ** 2  # Qwen2.5-VL's 112-pixel attention windows; 4 of the 32 blocks attend globally
    full_blocks = 4 if arch.vision_depth == 32 else 1
    attention = 4 * arch.vision_hidden_size * ((arch.vision_depth - full_blocks) * min(window, patches_per_image)
                                               + full_blocks * patches_per_image)
    vision = n * patches_per_image * (2 * arch.vision_params + attention)
    return float(text + vision)


def peak_flops(args, device_name: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    for name, tflops in PEAK_BF16_TFLOPS:
        if name in device_name:
            return tflops * 1e12
    return None


def learner_estimate(args, arch, batch, gpu_gib: float) -> tuple[float, str]:
    """The plan's estimate (GiB) of model states plus this micro-batch's activations on one GPU."""
    from mmupt.config import Settings
    from mmupt.plan import activation_model, model_state_terms

    precision = "bf16" if args.device == "cuda" else "fp32"
    settings = Settings.model_validate({
        "model": {"dtype": "bfloat16" if args.device == "cuda" else "float32", "device": args.device},
        "learner": {"zero_stage": args.zero_stage, "precision": precision},
        "deployment": {"learner_ranks": 1, "gpu_memory_gib": gpu_gib}})
    gpu_terms, _ = model_state_terms(arch, settings)
    states = sum(t.nbytes for t in gpu_terms) / GiB
    act = activation_model(arch, precision)
    patches = int(batch.image_grid_thw.prod(dim=1).sum())
    activations = (batch.input_ids.numel() * act.per_token + patches * act.per_patch) / GiB
    return states + activations, (f"model states {states:.1f} GiB + activations {activations:.1f} GiB of "
                                  f"{gpu_gib:.0f} GiB (plan estimate)")


def part_learner(args) -> dict:
    import torch

    from mmupt.architectures import find_architecture
    from mmupt.config import LearnerSettings
    from mmupt.model import load_processor

    from transformers import AutoConfig

    folder = model_folder(args)
    arch = find_architecture(folder)
    settings = model_settings(args, folder)
    batch = synthetic_batch(args, load_processor(settings), AutoConfig.from_pretrained(folder))
    name, gpu_gib = device_info(args.device)
    needed, verdict = learner_estimate(args, arch, batch, gpu_gib)
    log(f"learner {args.size}: {verdict}")
    if args.device == "cuda" and needed > 0.95 * gpu_gib and not args.force:
        return {"skipped": f"{verdict}: does not fit one GPU (fewer --sequences or --response-tokens, or more "
                           "ranks/offload; --force tries anyway)"}
    from mmupt.services.learner.engine import PolicyEngine

    precision = "bf16" if args.device == "cuda" else "fp32"
    cfg = LearnerSettings(batch_groups=1, micro_groups=1, zero_stage=args.zero_stage, precision=precision,
                          lr=1e-6, kl_coef=0.01)
    engine = PolicyEngine(settings, cfg, temperature=0.7)
    engine.train_step([batch])  # warm-up: allocator, kernels, DeepSpeed buffers
    synchronize(args.device)
    seconds = []
    for step in range(args.steps):
        started = time.perf_counter()
        stats = engine.train_step([batch])
        synchronize(args.device)
        seconds.append(time.perf_counter() - started)
        log(f"learner step {step + 1}/{args.steps}: {seconds[-1]:.2f}s, loss {stats['loss']:.4f}")
    per_step = sum(seconds) / len(seconds)
    tokens = batch.input_ids.numel()
    flops = (3 + (1 if cfg.kl_coef > 0 else 0)) * forward_flops(arch, batch)  # fwd+bwd = 3 fwd, + reference fwd
    peak = peak_flops(args, name)
    result = {"device": name, "params": arch.params, "zero_stage": args.zero_stage, "precision": precision,
              "sequences": batch.input_ids.shape[0], "sequence_tokens": batch.input_ids.shape[1],
              "response_tokens": int(batch.mask.sum()), "step_seconds": per_step,
              "tokens_per_s": tokens / per_step, "response_tokens_per_s": float(batch.mask.sum()) / per_step,
              "model_tflops_per_s": flops / per_step / 1e12, "mfu": flops / per_step / peak if peak else None,
              "estimated_gib": needed, "loss": stats["loss"]}
    if args.device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / GiB
    return result


# ---- generation ---------------------------------------------------------------------------------
def part_generate(args) -> dict:
    from mmupt.services.rollout.backend import PromptInput, SamplingParams
    from mmupt.services.rollout.hf_backend import TransformersBackend

    folder = model_folder(args)
    backend = TransformersBackend(model_settings(args, folder))
    prompt = PromptInput(text=prompt_text(backend.processor), images=[random_image(args.image_side)])
    params = SamplingParams(n=args.group_size, temperature=0.7, top_p=0.99, max_new_tokens=args.gen_tokens, seed=0)
    backend.generate([prompt], SamplingParams(n=args.group_size, max_new_tokens=8, seed=0))  # warm-up
    synchronize(args.device)
    tokens, seconds = 0, []
    for i in range(args.gen_prompts):
        started = time.perf_counter()
        [group] = backend.generate([prompt], params)
        synchronize(args.device)
        seconds.append(time.perf_counter() - started)
        tokens += sum(len(c.token_ids) for c in group.completions)
        log(f"generate group {i + 1}/{args.gen_prompts}: {seconds[-1]:.2f}s")
    total = sum(seconds)
    return {"device": device_info(args.device)[0], "group_size": args.group_size, "max_new_tokens": args.gen_tokens,
            "groups": args.gen_prompts, "generated_tokens": tokens, "tokens_per_s": tokens / total,
            "seconds_per_group": total / args.gen_prompts,
            "mean_response_tokens": tokens / (args.gen_prompts * args.group_size)}


# ---- weight sync --------------------------------------------------------------------------------
def start_rollout(args, folder: Path, redis_url: str, token: str, scratch: Path):
    import httpx
    import yaml

    from mmupt.embedded_redis import free_port

    http_port, grpc_port = free_port(), free_port()
    settings = model_settings(args, folder)
    config = {"run_id": "bench-gpu", "redis_url": redis_url, "model": settings.model_dump(),
              "rollout": {"backend": "transformers", "host": "127.0.0.1", "http_port": http_port,
                          "grpc_port": grpc_port}}
    (scratch / "rollout.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMUPT_")} | {"MMUPT_AUTH__TOKEN": token}
    proc = subprocess.Popen([sys.executable, "-m", "mmupt", "rollout", "--config", str(scratch / "rollout.yaml")],
                            env=env, stdout=open(scratch / "rollout.log", "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}/v1/version"
    deadline = time.monotonic() + args.part_timeout / 2
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the rollout server exited: {(scratch / 'rollout.log').read_text()[-2000:]}")
        try:
            info = httpx.get(url, timeout=5).json()
            if info.get("ready"):  # HTTP answers while the weights still load
                return proc, url, f"127.0.0.1:{grpc_port}", info
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    proc.terminate()
    raise RuntimeError("the rollout server did not answer in time")


def part_grpc_push(args) -> dict:
    import httpx

    from mmupt.config import LearnerSettings
    from mmupt.embedded_redis import EmbeddedRedis
    from mmupt.model import load_model
    from mmupt.services.learner.weight_push import WeightPusher
    from mmupt.weights import state_checksum

    folder = model_folder(args)
    token = secrets.token_urlsafe(24)
    with EmbeddedRedis() as redis, tempfile.TemporaryDirectory() as scratch:
        proc, url, address, before = start_rollout(args, folder, redis.url, token, Path(scratch))
        try:
            state = {k: v.detach() for k, v in load_model(model_settings(args, folder)).state_dict().items()}
            nbytes = sum(t.numel() * t.element_size() for t in state.values())
            pusher = WeightPusher(token, "bench-gpu", LearnerSettings().push_chunk_bytes, timeout_s=3600)
            probe = next(name for name, t in state.items() if t.is_floating_point())
            seconds = []
            for version in range(1, args.pushes + 1):
                state[probe] = state[probe] + 1.0  # every version differs: the swap must be real
                synchronize(args.device)
                started = time.perf_counter()
                [result] = pusher.push(state, version, [address])
                seconds.append(time.perf_counter() - started)
                if not result.ok:
                    raise RuntimeError(f"push of version {version} failed: {result.detail}")
                log(f"push {version}/{args.pushes}: {nbytes / GiB:.2f} GiB in {seconds[-1]:.2f}s")
            after = httpx.get(url, timeout=30).json()
            expected = state_checksum(state)
            pusher.close()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    verified = after["version"] == args.pushes and after["checksum"] == expected != before["checksum"]
    if not verified:
        raise RuntimeError(f"the server serves {after}, expected version {args.pushes} with checksum {expected}")
    per_push = sum(seconds) / len(seconds)
    return {"device": device_info(args.device)[0], "bytes": nbytes, "tensors": len(state),
            "seconds_per_push": per_push, "gb_per_s": nbytes / per_push / 1e9, "verified": verified,
            "dtype": str(next(iter(state.values())).dtype).replace("torch.", "")}


def _broadcast_worker(rank: int, nbytes: int, device: str, port: int, result: str) -> None:
    import torch
    import torch.distributed as dist

    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    bucket = torch.empty(min(BUCKET_BYTES, nbytes), dtype=torch.uint8, device=device)
    buckets = math.ceil(nbytes / BUCKET_BYTES)
    dist.broadcast(bucket, src=0)  # warm-up: connection set-up
    synchronize(device)
    dist.barrier()
    started = time.perf_counter()
    for i in range(buckets):
        size = min(BUCKET_BYTES, nbytes - i * BUCKET_BYTES)
        dist.broadcast(bucket[:size], src=0)
    synchronize(device)
    seconds = time.perf_counter() - started
    if rank == 0:
        Path(result).write_text(json.dumps({"bytes": nbytes, "buckets": buckets, "seconds": seconds,
                                            "gb_per_s": nbytes / seconds / 1e9, "backend": backend}))
    dist.destroy_process_group()


def part_broadcast(args) -> dict:
    import torch
    import torch.multiprocessing as mp

    from mmupt.architectures import find_architecture
    from mmupt.embedded_redis import free_port

    if args.device == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": "an NCCL broadcast needs two GPUs; this machine has "
                           f"{torch.cuda.device_count()}"}
    arch = find_architecture(model_folder(args))
    nbytes = arch.params * (2 if args.device == "cuda" else 4)  # the state dict in the serving dtype
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "broadcast.json"
        mp.spawn(_broadcast_worker, args=(nbytes, args.device, free_port(), str(result)), nprocs=2, join=True)
        out = json.loads(result.read_text())
    log(f"broadcast: {nbytes / GiB:.2f} GiB in {out['seconds']:.2f}s ({out['gb_per_s']:.2f} GB/s, {out['backend']})")
    return out


# ---- the driver ---------------------------------------------------------------------------------
def device_info(device: str) -> tuple[str, float]:
    """(name, memory in GiB) of GPU 0, or of the CPU host."""
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        return props.name, props.total_memory / GiB
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", pages / GiB


def run_part(args, part: str, size: str) -> dict:
    """One part in a child process; its JSON result, or the reason it failed."""
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "result.json"
        argv = [sys.executable, __file__, *args.argv, "--part", part, "--size", size, "--result", str(result)]
        env = dict(os.environ)
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run stays on the CPU even where CUDA exists
            # A CPU run is a correctness check, often on a shared machine, where OpenMP threads spinning
            # against other processes made the tiny model's decode steps 30x slower (measured).
            env.setdefault("OMP_NUM_THREADS", "1")
        started = time.perf_counter()
        try:
            proc = subprocess.run(argv, env=env, timeout=args.part_timeout)
        except subprocess.TimeoutExpired:
            return {"failed": f"timed out after {args.part_timeout:.0f}s"}
        out = json.loads(result.read_text()) if result.is_file() else {}
        if proc.returncode != 0:
            return {"failed": out.get("failed") or f"exit code {proc.returncode} (see the output above)"}
        out["wall_seconds"] = time.perf_counter() - started
        return out


def summary_lines(results: dict) -> list[str]:
    lines = []
    for key, r in results.items():
        size, part = key.split("/")
        if "skipped" in r or "failed" in r:
            lines.append(f"{size:5} {part:10} {'skipped' if 'skipped' in r else 'FAILED'}: "
                         f"{r.get('skipped') or r.get('failed')}")
        elif part == "learner":
            mfu = f"MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "MFU n/a (unknown peak)"
            lines.append(f"{size:5} {part:10} {r['tokens_per_s']:,.0f} tokens/s ({r['sequences']} x "
                         f"{r['sequence_tokens']} tokens, {r['step_seconds']:.2f}s/step, ZeRO-{r['zero_stage']}), "
                         f"{r['model_tflops_per_s']:.1f} TFLOP/s, {mfu}")
        elif part == "generate":
            lines.append(f"{size:5} {part:10} {r['tokens_per_s']:,.0f} tokens/s ({r['group_size']} samples x "
                         f"{r['mean_response_tokens']:.0f} tokens, {r['seconds_per_group']:.2f}s/group)")
        elif part == "grpc_push":
            lines.append(f"{size:5} {part:10} {r['bytes'] / GiB:.2f} GiB in {r['seconds_per_push']:.2f}s = "
                         f"{r['gb_per_s']:.2f} GB/s, verified by the server: {r['verified']}")
        else:
            lines.append(f"{size:5} {part:10} {r['bytes'] / GiB:.2f} GiB in {r['seconds']:.2f}s = "
                         f"{r['gb_per_s']:.2f} GB/s ({r['backend']}, {r['buckets']} buckets)")
    return lines


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("learner", "tokens_per_s", "learner tokens/s"), ("generate", "tokens_per_s", "generated tokens/s"),
              ("grpc_push", "gb_per_s", "gRPC push GB/s"), ("broadcast", "gb_per_s", "broadcast GB/s")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (part, key, label) in zip(axes, panels):
        bars = {k.split("/")[0]: r[key] for k, r in results.items() if k.endswith("/" + part) and key in r}
        ax.bar(list(bars), list(bars.values()), color="tab:blue")
        ax.set_title(label, fontsize=10)
        if not bars:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part:
        runner = {"learner": part_learner, "generate": part_generate, "grpc_push": part_grpc_push,
                  "broadcast": part_broadcast}[args.part]
        try:
            Path(args.result).write_text(json.dumps(runner(args)))
        except Exception as exc:  # the summary names the reason; the traceback is printed above it
            Path(args.result).write_text(json.dumps({"failed": f"{type(exc).__name__}: {exc}"[:600]}))
            raise
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: CUDA is not available on this machine. This benchmark is meant for a GPU machine; "
              "to check the script on the CPU run it with --tiny --device cpu.", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.tiny:
        print("bench/gpu.py: full-size models are not run on the CPU; use --tiny --device cpu", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    results, started = {}, time.perf_counter()
    jobs = [(size, part) for size in sizes(args) for part in parts]
    for index, (size, part) in enumerate(jobs, 1):
        elapsed = time.perf_counter() - started
        eta = f", ETA {elapsed / (index - 1) * (len(jobs) - index + 1):.0f}s" if index > 1 else ""
        log(f"part {index}/{len(jobs)}: {part} ({size}), {elapsed:.0f}s so far{eta}")
        results[f"{size}/{part}"] = run_part(args, part, size)
    header = (f"bench/gpu.py on {device_info(args.device)[0]}, {datetime.now(timezone.utc):%Y-%m-%d}, "
              f"torch {torch.__version__} (built for CUDA {torch.version.cuda})")
    report = {"header": header,
              "args": {k: v for k, v in vars(args).items() if k not in ("part", "size", "result", "argv")},
              "results": results}
    (out / "gpu.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "gpu.png", header)
    print("\n" + header)
    print("\n".join(summary_lines(results)))
    print(f"\nwritten: {out / 'gpu.json'}, {out / 'gpu.png'}")
    return 1 if any("failed" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
