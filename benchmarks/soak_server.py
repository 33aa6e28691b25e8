"""The server a soak test loads: starting and stopping it, its health and metrics endpoints, and
the resident memory of its processes, sampled while the load runs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

# --- the server ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Run in every server process when --tracemalloc is given (a sitecustomize on PYTHONPATH): the
# first SIGUSR2 starts tracing (so start-up runs at full speed), the second takes a snapshot and
# writes what was allocated in between and is still live, largest first.
_TRACEMALLOC_SITE = textwrap.dedent("""
    import os, signal, tracemalloc
    def _dump(signum, frame):
        if not tracemalloc.is_tracing():
            tracemalloc.start(10)
            return
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        out = os.path.join(os.environ["SOAK_TRACEMALLOC_DIR"], f"pid-{os.getpid()}.txt")
        stats = snap.statistics("traceback")
        with open(out, "w") as f:
            f.write(f"pid {os.getpid()} {open('/proc/self/cmdline').read()[:100]!r}\\n")
            f.write(f"live since tracing began {sum(s.size for s in stats) / 2**20:.1f} MiB\\n")
            for s in stats[:25]:
                f.write(f"{s.size / 2**20:.2f} MiB in {s.count} blocks\\n")
                f.write("".join("    " + line + "\\n" for line in s.traceback.format()[-8:]))
    signal.signal(signal.SIGUSR2, _dump)
""")


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(model: str, spec: dict[str, Any] | None, extra: list[str], log: Path,
                 tracemalloc_dir: Path | None = None, timeout: float = 900) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--seed", "0",
           "--enforce-eager", *extra]
    if spec is not None:
        cmd += ["--speculative-config", json.dumps(spec)]
    env = os.environ.copy()
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if tracemalloc_dir is not None:
        site = Path(tempfile.mkdtemp(prefix="soak-site-"))
        (site / "sitecustomize.py").write_text(_TRACEMALLOC_SITE)
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
        env["SOAK_TRACEMALLOC_DIR"] = str(tracemalloc_dir)
        tracemalloc_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    server = Server(proc, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log {log}:\n"
                               + log.read_text()[-3000:])
        if health(server.url, 2.0)[0]:
            return server
        time.sleep(1)
    stop_server(server)
    raise TimeoutError(f"server did not become healthy in {timeout:.0f} s; log {log}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


def health(url: str, timeout: float) -> tuple[bool, float]:
    start = time.monotonic()
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200, time.monotonic() - start
    except OSError:
        return False, time.monotonic() - start


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def label(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          key: str) -> str | None:
    for (n, labels), _ in samples.items():
        if n == name:
            return dict(labels).get(key)
    return None


# --- memory --------------------------------------------------------------------------------------


def server_processes(server: Server) -> dict[str, Any]:
    """The API server, engine core and worker processes by role (psutil.Process)."""
    import psutil

    root = psutil.Process(server.proc.pid)
    found: dict[str, Any] = {"api_server": root}
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            title = " ".join(child.cmdline())[:80]
            if "EngineCore" in title:
                found.setdefault("engine_core", child)
            elif "Worker" in title:
                found.setdefault("worker", child)
    return found


class Periodic:
    """Calls `tick` every `interval` seconds in a thread, for the duration of a `with` block, and
    once more as the block ends."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Periodic:
        self.start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.tick()
            if self._stop.wait(self.interval):
                self.tick()
                return


class MemorySampler(Periodic):
    """RSS of each server process every `interval` seconds, with the progress at that time."""

    def __init__(self, server: Server, progress: list[int], interval: float = 2.0) -> None:
        super().__init__(interval)
        self.procs = server_processes(server)
        self.progress = progress
        self.samples: list[tuple[float, int, dict[str, float]]] = []

    def tick(self) -> None:
        self.sample()

    def sample(self) -> None:
        rss = {}
        for role, proc in self.procs.items():
            with contextlib.suppress(Exception):
                rss[role] = proc.memory_info().rss / 2**20
        self.samples.append((time.monotonic() - self.start, self.progress[0], rss))

    def report(self, from_done: int, load_end: float) -> dict[str, dict[str, float]]:
        """Per process: RSS (MiB) at the start, middle and end of the load, and the
        least-squares slope over the second half of the samples taken under load after
        `from_done` requests had completed, per minute and per 1000 completed requests; then
        the RSS at the end of the idle time after the load."""
        out = {}
        loaded = [s for s in self.samples if s[1] >= from_done and s[0] <= load_end]
        for role in self.procs:
            points = [(t, done, rss[role]) for t, done, rss in loaded if role in rss]
            if len(points) < 4:
                continue
            half = points[len(points) // 2:]
            out[role] = {
                "start_mib": points[0][2], "mid_mib": half[0][2], "end_mib": points[-1][2],
                "max_mib": max(p[2] for p in points),
                "idle_end_mib": self.samples[-1][2].get(role, float("nan")),
                "slope_mib_per_min": 60 * _slope([(t, m) for t, _, m in half]),
                "slope_mib_per_1000_requests": 1000 * _slope([(d, m) for _, d, m in half]),
            }
        return out


def _slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in points) / var
