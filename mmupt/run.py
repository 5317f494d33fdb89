"""`mmupt run`: the whole system on one machine, each service its own process.

Prepares the model and data, starts the embedded Valkey server (unless `redis_url` is set), starts
rollout, voter and learner as separate processes, shows progress, stops everything cleanly at the
end or on Ctrl-C, and writes `summary.json`.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from .config import Settings
from .data import ensure_data
from .embedded_redis import EmbeddedRedis, free_port
from .model import ensure_model
from .streams import Streams, connect

log = logging.getLogger(__name__)
SERVICES = ("rollout", "voter", "learner")


class RunFailed(RuntimeError):
    pass


@dataclass
class Children:
    out: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, config_path: Path, env: dict[str, str], args: tuple[str, ...] = ()) -> None:
        log_file = open(self.out / "logs" / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "mmupt", name, "--config", str(config_path), *args],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def failed(self) -> str | None:
        """Name of a service that exited with an error, if any."""
        for name, proc in self.procs.items():
            code = proc.poll()
            if code is not None and (code != 0 or name != "learner"):
                return name
        return None

    def tail(self, name: str, lines: int = 30) -> str:
        text = (self.out / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def prepare(settings: Settings, out: Path, run_id: str, redis_url: str) -> tuple[Settings, Path, dict[str, str]]:
    """Resolve ports, paths and the token; write the resolved config the services read."""
    ensure_model(settings.model)
    ensure_data(settings.data)
    token_file = out / "token"
    if settings.auth.resolve_token() is None:
        token_file.write_text(secrets.token_urlsafe(32))
        token_file.chmod(0o600)
    else:
        token_file = Path(settings.auth.token_file) if settings.auth.token_file else None
    resolved = settings.model_copy(deep=True)
    resolved.run_id = run_id
    resolved.redis_url = redis_url
    resolved.model.path = str(Path(settings.model.path).resolve())
    resolved.data.train = str(Path(settings.data.train).resolve())
    if settings.data.eval:
        resolved.data.eval = str(Path(settings.data.eval).resolve())
    resolved.learner.checkpoint_dir = str((out / "checkpoints").resolve())
    for section in (resolved.rollout, resolved.voter, resolved.learner):
        section.host = "127.0.0.1"
        section.http_port = free_port()
    resolved.rollout.grpc_port = free_port()
    resolved.auth.token = None
    resolved.auth.token_file = str(token_file.resolve()) if token_file else None
    config_path = out / "config.yaml"
    config_path.write_text(resolved.dump_yaml())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMUPT_")}  # the file is complete
    if settings.auth.token and not settings.auth.token_file:
        env["MMUPT_AUTH__TOKEN"] = settings.auth.token  # never written to disk
    env["PYTHONUNBUFFERED"] = "1"
    # Several torch processes share the cores: OpenMP's default busy-waiting then slows small ops
    # by up to ~100x (measured here on 2 cores). Passive waiting costs nothing when cores are free.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return resolved, config_path, env


def wait_learner(children: Children, streams: Streams, max_steps: int) -> None:
    bar = tqdm(total=max_steps, desc="training", unit="step", dynamic_ncols=True)
    shown = 0
    try:
        while True:
            state = streams.state()
            step = int(state.get("step", 0))
            if step > shown:
                bar.update(step - shown)
                shown = step
                bar.set_postfix(version=state.get("version"), reward=f"{float(state.get('last_mean_reward', 0)):.3f}")
            failed = children.failed()
            if failed:
                raise RunFailed(f"the {failed} service exited (code {children.procs[failed].returncode}):\n"
                                f"{children.tail(failed)}")
            if children.procs["learner"].poll() == 0:
                if state.get("status") != "finished":
                    raise RunFailed("the learner exited before finishing:\n" + children.tail("learner"))
                return
            time.sleep(0.5)
    finally:
        bar.close()


def rollout_version(settings: Settings) -> dict:
    url = f"http://127.0.0.1:{settings.rollout.http_port}/v1/version"
    return httpx.get(url, timeout=30).json()


def summarize(streams: Streams, rollout: dict | None, status: str, started: float) -> dict:
    state = streams.state()
    count = int(state.get("reward_count", 0))
    inflight = streams.r.hlen(streams.keys.inflight)
    return {
        "status": status,
        "run_id": streams.keys.prefix.split(":")[1],
        "steps": int(state.get("step", 0)),
        "policy_version": int(state.get("version", 0)),
        "rollout_policy_version": rollout.get("version") if rollout else None,
        "rollout_weights_checksum": rollout.get("checksum") if rollout else None,
        "initial_weights_checksum": rollout.get("initial_checksum") if rollout else None,
        "prompts_admitted": int(state.get("admitted", 0)),
        "prompts_synthetic": int(state.get("synthetic", 0)),
        "groups_trained": int(state.get("trained", 0)),
        "groups_dropped_stale": int(state.get("dropped_stale", 0)),
        "groups_dropped_vote": int(state.get("dropped_vote", 0)),
        "groups_skipped_zero_advantage": int(state.get("skipped_zero_advantage", 0)),
        "groups_deadlettered": int(state.get("deadlettered", 0)),
        "duplicate_groups": int(state.get("duplicates", 0)),
        "groups_in_flight": inflight,
        "mean_reward": float(state.get("reward_sum", 0.0)) / count if count else None,
        "checkpoint": state.get("checkpoint"),
        "streams": streams.pending_counts(),
        "wall_seconds": round(time.monotonic() - started, 2),
    }


def measure_heldout(settings: Settings, model_dir: str | None, when: str) -> dict | None:
    """Held-out accuracy of `model_dir` on data.eval (its labels read for evaluation only), or None
    when evaluation is off, there is no held-out file or no model."""
    ev = settings.evaluation
    if not (ev.enabled and settings.data.eval and model_dir):
        return None
    from .eval import heldout_accuracy, load_benchmark  # noqa: PLC0415

    items = load_benchmark(settings.data.eval, ev.limit)
    temperature = settings.rollout.temperature if ev.temperature is None else ev.temperature
    log.info("measuring held-out accuracy %s training (%d questions, k=%d)", when, len(items), ev.k)
    result = heldout_accuracy(settings, items, ev.k, temperature, settings.rollout.max_new_tokens, model_dir=model_dir)
    log.info("held-out %s: accuracy %.3f, greedy %.3f, maj@%d %.3f", when, result["accuracy"],
             result["greedy_accuracy"], ev.k, result["maj_accuracy"])
    return result


def run(settings: Settings, out: Path, run_id: str | None = None, resume: bool = False) -> dict:
    """`resume`: continue the run in `out` (same run_id) from its newest checkpoint."""
    started = time.monotonic()
    run_id = run_id or f"{settings.run_id}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    embedded = None
    redis_url = settings.redis_url
    if not redis_url:
        embedded = EmbeddedRedis()
        redis_url = embedded.start()
    children = Children(out)
    status, rollout = "failed", None
    try:
        resolved, config_path, env = prepare(settings, out, run_id, redis_url)
        eval_before = measure_heldout(resolved, resolved.model.path, "before")
        streams = Streams(connect(redis_url), run_id, resolved.streams)
        streams.ensure_groups()
        for name in SERVICES:
            children.start(name, config_path, env, ("--resume",) if resume and name == "learner" else ())
        log.info("run %s: services started, logs in %s", run_id, out / "logs")
        try:
            wait_learner(children, streams, resolved.learner.max_steps)
            rollout = rollout_version(resolved)
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
        children.stop()  # frees the cores for the evaluation
        summary = summarize(streams, rollout, status, started)
        summary["eval_before"] = eval_before
        summary["eval_after"] = measure_heldout(resolved, summary["checkpoint"] if status == "finished" else None,
                                                "after")
        summary["wall_seconds"] = round(time.monotonic() - started, 2)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        children.stop()
        if embedded is not None:
            embedded.stop()
