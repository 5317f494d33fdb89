"""bench/gpu.py is meant for a GPU machine; here its CPU mode runs at tiny size and must produce real,
verified figures, and without CUDA it must refuse clearly instead of silently measuring the CPU."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "gpu.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_refuses_unless_asked_for_the_cpu(capsys):
    bench = load_bench()
    assert bench.main(["--tiny"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--model", "7b"]) == 2
    assert "use --tiny --device cpu" in capsys.readouterr().err


def test_random_full_size_network_keeps_the_public_shape():
    """The bench pairs the public network with the offline tokenizer's ids: same parameters."""
    from mmupt.architectures import describe, public_config

    ids = {"image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4,
           "bos_token_id": 0, "eos_token_id": 2}
    config = public_config("3b", ids)
    assert config.image_token_id == 5 and config.text_config.eos_token_id == 2
    assert describe(config, "x", "test").params == 3_754_622_976


def test_tiny_cpu_mode_measures_every_part(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCH), "--tiny", "--device", "cpu", "--out", str(out), "--workdir",
           str(tmp_path / "work"), "--steps", "1", "--sequences", "2", "--response-tokens", "16",
           "--gen-prompts", "1", "--gen-tokens", "8", "--pushes", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    r = report["results"]
    assert r["tiny/learner"]["tokens_per_s"] > 0 and math.isfinite(r["tiny/learner"]["loss"])
    assert r["tiny/learner"]["response_tokens"] == 2 * 16
    assert 0 < r["tiny/generate"]["generated_tokens"] <= 10 * 8
    push = r["tiny/grpc_push"]
    assert push["verified"] is True and push["bytes"] > 0 and push["gb_per_s"] > 0
    # The broadcast moves the state dict's size: the same bytes the push carried (fp32 on the CPU).
    assert r["tiny/broadcast"]["bytes"] == push["bytes"] and r["tiny/broadcast"]["backend"] == "gloo"
    assert (out / "gpu.png").stat().st_size > 0
    assert "tiny  grpc_push" in proc.stdout and "verified by the server: True" in proc.stdout
