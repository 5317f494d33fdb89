"""Time-bounded symbolic comparison in a child process.

sympy (and math-verify, which builds on it) cannot be interrupted from a thread, and a hostile
answer such as `\\boxed{9^{9^{9^{9}}}}` can keep it busy for hours or eat all memory. So symbolic
comparisons run in a worker process that we can kill: the caller sends one JSON line per request
and waits for the JSON reply until a deadline; past it the worker is killed (SIGKILL) and the
comparison counts as not equal. A warm spare worker takes over at once, so a kill does not make the
next comparisons wait for a fresh interpreter to import sympy.

Only JSON (strings, lists, booleans) crosses the pipe: nothing executable, no pickle.

Requests (one JSON object a line):
  {"op": "sympy", "pairs": [[truth, given], ...]}  MathRuler's sympy rule on every element pair (all must hold)
  {"op": "mathruler", "given": a, "truth": b}      MathRuler's whole grade_answer (answers too long for the fast path)
  {"op": "math_verify", "given": a, "gold": b}     math-verify's parse and verify of two boxed answers
Reply: {"equal": bool}.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict

log = logging.getLogger(__name__)

# The worker's address-space cap: a runaway expression fails with MemoryError instead of taking the host down.
WORKER_MEMORY_BYTES = 4 * 1024**3
_CACHE_SIZE = 8192
_CACHE_MAX_CHARS = 512  # longer requests are not cached (bounded memory)


class WorkerDied(RuntimeError):
    pass


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _kill_live_workers() -> None:
    for worker in list(_LIVE):
        worker.kill()


class _Worker:
    """One child process and a line-buffered reader on its stdout."""

    def __init__(self, preload: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mmupt.services.voter.symbolic", preload],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self._buf = b""
        self.ready = False
        _LIVE.add(self)

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise WorkerDied(f"symbolic worker exited (code {self.proc.poll()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def wait_ready(self, deadline: float) -> bool:
        if not self.ready:
            line = self._read_line(deadline)
            if line is None:
                return False
            self.ready = json.loads(line).get("ready", False)
        return self.ready

    def ask(self, request: dict, deadline: float) -> bool | None:
        """The worker's answer, or None when the deadline passed first (the worker is then busy)."""
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        self.proc.stdin.flush()
        line = self._read_line(deadline)
        return None if line is None else bool(json.loads(line)["equal"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class SymbolicPool:
    """Runs symbolic comparisons in a killable worker, with a warm spare and a result cache.

    `compare(request, timeout)` returns True/False, or None when it ran out of time. Thread-safe:
    callers take turns, and waiting for the turn counts against the caller's timeout.
    """

    def __init__(self, preload: str = "mathruler"):
        self.preload = preload
        self._lock = threading.Lock()
        self._active: _Worker | None = None
        self._spare: _Worker | None = None
        self._cache: OrderedDict[str, bool | None] = OrderedDict()
        self.kills = 0

    def start(self, wait: bool = False, timeout: float = 60.0) -> None:
        """Start the workers now (they import sympy, ~0.5-2 s) rather than on the first comparison;
        with `wait`, return once the active one is ready."""
        with self._lock:
            self._ensure()
            if wait and not self._active.wait_ready(time.monotonic() + timeout):
                raise WorkerDied(f"symbolic worker not ready after {timeout} s")

    def _ensure(self) -> None:
        if self._active is None:
            self._active = self._spare or _Worker(self.preload)
            self._spare = None
        if self._spare is None:
            self._spare = _Worker(self.preload)

    def _replace_active(self) -> None:
        if self._active is not None:
            self._active.kill()
            self._active = None
        self._ensure()

    def compare(self, request: dict, timeout: float, full_timeout: float | None = None) -> bool | None:
        """`full_timeout`: the per-comparison bound; a request that kept the worker busy past its
        deadline, having had at least half of that bound, is remembered as timing out, so a repeated
        hostile answer costs its time once, not in every group."""
        key = json.dumps(request, separators=(",", ":"))
        cacheable = len(key) <= _CACHE_MAX_CHARS
        if cacheable:
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
        if self._active is None:
            self.start(wait=True)  # first use: starting up is not the comparison's time
        deadline = time.monotonic() + timeout
        if timeout <= 0 or not self._lock.acquire(timeout=timeout):
            return None
        try:
            kills = self.kills
            result = self._ask(request, deadline)
            hostile = result is None and self.kills > kills and full_timeout is not None and timeout >= full_timeout / 2
            if cacheable and (result is not None or hostile):
                self._cache[key] = result
                if len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
            return result
        finally:
            self._lock.release()

    def _ask(self, request: dict, deadline: float) -> bool | None:
        for attempt in (1, 2):  # a worker that died (e.g. out of memory) is replaced and asked once more
            self._ensure()
            worker = self._active
            try:
                if not worker.wait_ready(deadline):
                    return None  # still importing: healthy, keep it
                result = worker.ask(request, deadline)
            except (WorkerDied, BrokenPipeError, ValueError, KeyError) as exc:
                log.warning("symbolic worker failed (%s); replacing it", exc)
                self._replace_active()
                if attempt == 2 or time.monotonic() >= deadline:
                    return None
                continue
            if result is None:  # busy past the deadline: it may never come back
                self.kills += 1
                self._replace_active()
            return result
        return None

    def close(self) -> None:
        with self._lock:
            for worker in (self._active, self._spare):
                if worker is not None:
                    worker.kill()
            self._active = self._spare = None


# ---- the worker process ---------------------------------------------------------------------------
def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):  # not available on this platform: the timeout still holds
        pass


def _clearly_nonzero(diff) -> bool:
    """Whether `diff` is demonstrably not identically zero: nonzero at a sample point, to 50 digits.

    Then `simplify(diff) == 0` cannot hold, and we skip simplify, which takes 30-800 ms where this
    takes 0.2 ms. Anything unclear (no number comes out, a pole, a value near 0) says False, and the
    caller falls back to simplify, so the verdict is MathRuler's either way.
    """
    import sympy

    if not isinstance(diff, sympy.Expr):
        return False
    symbols = sorted(diff.free_symbols, key=str)
    for offset in (sympy.Rational(37, 100), sympy.Rational(123, 100)):
        point = {s: offset + sympy.Rational(k, 7) for k, s in enumerate(symbols)}
        value = diff.evalf(50, subs=point)
        if not value.is_number:
            return False
        try:
            number = complex(value)
        except (TypeError, ValueError):
            return False
        if number != number or abs(number) == float("inf"):
            return False
        if abs(number) > 1e-9:
            return True
    return False


class _Handlers:
    def __init__(self, preload: str):
        from mathruler.grader import grade_answer

        self.grade_answer = grade_answer
        self._parsed: OrderedDict[str, list] = OrderedDict()
        # Warm up before reporting ready: first calls compile parsers and caches (~1 s for math-verify).
        if preload == "math_verify":
            logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that we disabled its timeout
            self.handle({"op": "math_verify", "given": "0.5", "gold": "\\frac{1}{2}"})
        else:
            self.handle({"op": "sympy", "pairs": [["1/2", "0.5"]]})

    @staticmethod
    def _math_verify():
        from math_verify import parse, verify

        return parse, verify

    def _parse(self, answer: str) -> list:
        """math-verify parse of a bare answer, as the box it came from; cached (answers repeat)."""
        if answer not in self._parsed:
            parse, _ = self._math_verify()
            # No signal-based timeout inside: the parent kills this process instead.
            self._parsed[answer] = parse("\\boxed{" + answer + "}", parsing_timeout=None)
            if len(self._parsed) > 4096:
                self._parsed.popitem(last=False)
        return self._parsed[answer]

    @staticmethod
    def sympy_equal(truth: str, given: str) -> bool:
        """MathRuler's sympy rule, `simplify((truth)-(given)) == 0` on its parse (and its refusals),
        with a numeric check first that answers "not equal" without simplify where it clearly is not."""
        import sympy
        from mathruler.grader import _sympy_parse, should_allow_eval

        expr = f"({truth})-({given})"
        if not should_allow_eval(expr):
            return False
        try:
            diff = _sympy_parse(expr)
            if _clearly_nonzero(diff):
                return False
            return bool(sympy.simplify(diff) == 0)
        except Exception:  # noqa: BLE001 - as MathRuler: what cannot be parsed or simplified is not equal
            return False

    def handle(self, request: dict) -> bool:
        op = request["op"]
        if op == "sympy":
            return all(self.sympy_equal(truth, given) for truth, given in request["pairs"])
        if op == "mathruler":
            return bool(self.grade_answer(request["given"], request["truth"]))
        if op == "math_verify":
            _, verify = self._math_verify()
            return bool(verify(self._parse(request["gold"]), self._parse(request["given"]), timeout_seconds=None))
        raise ValueError(f"unknown op {op!r}")


def _exit_with_parent() -> None:
    """End this worker when its parent goes away, even in the middle of a long computation."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def worker_main(preload: str) -> int:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    _exit_with_parent()
    _limit_memory()
    handlers = _Handlers(preload)
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:  # EOF (the parent closed the pipe or died) ends the worker
        try:
            equal = handlers.handle(json.loads(line))
        except Exception:  # noqa: BLE001 - unparsable or failing comparisons are "not equal", as upstream
            equal = False
        out.write(b'{"equal": true}\n' if equal else b'{"equal": false}\n')
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1] if len(sys.argv) > 1 else "mathruler"))
