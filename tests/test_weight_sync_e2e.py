"""Weight sync through the real services: learner, voter and rollout as separate processes on the
collective path, and a second rollout server that joins mid-run and must catch up (cold sync)."""
import subprocess
import sys
import time

import httpx
import pytest

from mmupt.embedded_redis import free_port
from mmupt.run import SERVICES, Children, prepare
from mmupt.streams import Streams, connect

pytestmark = pytest.mark.slow


def wait_for(condition, children: Children, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        failed = children.failed()
        assert failed is None, f"the {failed} service exited:\n{children.tail(failed)}"
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def served(http_port: int) -> dict:
    try:
        return httpx.get(f"http://127.0.0.1:{http_port}/v1/version", timeout=5).json()
    except httpx.HTTPError:
        return {}


def test_a_late_joining_rollout_server_catches_up_over_the_collective_path(settings, tmp_path):
    settings.learner.weight_sync = "collective"
    settings.learner.max_steps = 1000  # the test stops the run once it has seen what it needs
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    resolved, config_path, env = prepare(settings, out, settings.run_id, settings.redis_url)
    streams = Streams(connect(settings.redis_url), settings.run_id, resolved.streams)
    streams.ensure_groups()
    children = Children(out)
    late, late_http, late_grpc = None, free_port(), free_port()
    try:
        for name in SERVICES:
            children.start(name, config_path, env)
        wait_for(lambda: streams.state_int("version") >= 1, children, 300, "the first optimizer step")

        # A second rollout server joins the running system, serving the initial weights (version 0).
        late_env = {**env, "MMUPT_ROLLOUT__HTTP_PORT": str(late_http), "MMUPT_ROLLOUT__GRPC_PORT": str(late_grpc)}
        with open(out / "logs" / "late-rollout.log", "wb") as log:
            late = subprocess.Popen([sys.executable, "-m", "mmupt", "rollout", "--config", str(config_path)],
                                    env=late_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        joined = wait_for(lambda: f"127.0.0.1:{late_grpc}" in streams.servers() and streams.state_int("version"),
                          children, 300, "the late server to register")
        wait_for(lambda: served(late_http).get("version", 0) >= joined, children, 120, "the late server to catch up")
        # ... and from then on it gets every new version like the first server, the same bytes.
        def same_version_both():
            first, second = served(resolved.rollout.http_port), served(late_http)
            return first.get("version", -1) == second.get("version", -2) > joined and (first, second)
        first, second = wait_for(same_version_both, children, 300, "a later version on both servers")
        assert first["checksum"] == second["checksum"] != second["initial_checksum"]
        late_log = (out / "logs" / "late-rollout.log").read_text()
        assert "joined weight-sync group" in late_log and "now serving version" in late_log
    finally:
        if late is not None:
            late.terminate()
            try:
                late.wait(timeout=30)
            except subprocess.TimeoutExpired:
                late.kill()
        children.stop()
