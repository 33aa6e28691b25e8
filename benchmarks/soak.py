"""Soak test: the OpenAI server with lookahead under sustained, messy load.

Starts `python -m vllm.entrypoints.openai.api_server` (a subprocess, the tiny test model unless
`--model`), sends `--requests` completions with random prompt and output lengths, at most
`--concurrency` in flight, a `--disconnect-rate` share of them streamed and dropped by the client
mid-stream, some with per-request lookahead options and a few with a prompt over the limit
(answered 400). Meanwhile it polls `/health` every second and samples the resident memory of the
server's processes (API server, engine core, worker) with psutil. Afterwards it reads `/metrics`:
the lookahead state must be empty (`vllm:lookahead_live_requests` 0), the shared corpus within its
budget (`vllm:lookahead_shared_tokens` <= `shared_pool_tokens`), and it fits the RSS slope over
the second half of the run. `--verify` then replays every completed greedy request on a server
without speculation (same engine arguments) and compares the tokens; with a small KV cache
(`--num-gpu-blocks 40`) requests are preempted and resumed under the load first.

    .venv/bin/python -m benchmarks.soak --requests 2000 --concurrency 32 --disconnect-rate 0.1
    .venv/bin/python -m benchmarks.soak --requests 300 --num-gpu-blocks 40 --verify
    .venv/bin/python -m benchmarks.soak --no-spec ...    # the same load without speculation

Prints one line per progress interval and a summary; `--json PATH` writes the figures.
`--tracemalloc DIR` traces the Python allocations of the server's processes from `--warmup`
completed requests to the end of the load and writes, per process, what is still live, by
allocation site, under DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.soak_server import (
    MemorySampler,
    Periodic,
    Server,
    health,
    label,
    scrape,
    server_processes,
    start_server,
    stop_server,
    total,
)
from benchmarks.tiny_model import tiny_model

DEFAULT_SPEC = {"method": "lookahead", "num_speculative_tokens": 6}
PHRASE_LEN = (2, 6)


# --- the load ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    index: int
    prompt: list[int]
    max_tokens: int
    greedy: bool
    ignore_eos: bool
    stream: bool
    disconnect_after: int | None
    """Chunks read before the client drops the connection (None: reads to the end)."""
    xargs: dict[str, Any] | None
    over_limit: bool


@dataclasses.dataclass
class Outcome:
    status: str
    """ok, disconnected, rejected (an expected 400), failed"""
    tokens: list[int]
    seconds: float
    detail: str = ""


def make_requests(n: int, seed: int, vocab: int, max_model_len: int, k: int,
                  disconnect_rate: float, max_output: int) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        over = rng.random() < 0.005
        if over:
            length = max_model_len + rng.randint(1, 64)
        else:
            length = rng.choice([rng.randint(1, 16), rng.randint(16, 128), rng.randint(128, 600)])
        if rng.random() < 0.3:  # repetitive text: drafts get accepted, the pools fill
            phrase = [rng.randrange(3, vocab) for _ in range(rng.randint(*PHRASE_LEN))]
            prompt = (phrase * (length // len(phrase) + 1))[:length]
        else:
            prompt = [rng.randrange(3, vocab) for _ in range(length)]
        room = max(1, max_model_len - len(prompt))
        max_tokens = min(rng.randint(1, max_output), room)
        disconnect = rng.random() < disconnect_rate and not over
        stream = disconnect or rng.random() < 0.5
        xargs: dict[str, Any] | None = None
        r = rng.random()
        if r < 0.1:
            xargs = {"lookahead_enabled": 0}
        elif r < 0.2:
            xargs = {"lookahead_namespace": f"tenant-{rng.randrange(4)}"}
        elif r < 0.25:
            xargs = {"lookahead_share": 0}
        elif r < 0.3:
            xargs = {"lookahead_num_speculative_tokens": rng.randint(0, k)}
        out.append(Request(i, prompt, max_tokens, greedy=rng.random() < 0.7,
                           ignore_eos=rng.random() < 0.7, stream=stream,
                           disconnect_after=rng.randint(1, 6) if disconnect else None,
                           xargs=xargs, over_limit=over))
    return out


def body(req: Request, model: str, with_xargs: bool = True) -> dict[str, Any]:
    b: dict[str, Any] = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens,
                         "temperature": 0.0 if req.greedy else 0.8, "stream": req.stream,
                         "ignore_eos": req.ignore_eos, "return_token_ids": True}
    if req.xargs and with_xargs:
        b["vllm_xargs"] = req.xargs
    return b


def _token_ids(choice: dict[str, Any]) -> list[int]:
    return list(choice.get("token_ids") or [])


async def send(session: Any, url: str, model: str, req: Request,
               with_xargs: bool = True) -> Outcome:
    import aiohttp

    start = time.monotonic()
    tokens: list[int] = []
    try:
        async with session.post(f"{url}/v1/completions", json=body(req, model, with_xargs),
                                timeout=aiohttp.ClientTimeout(total=1800)) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                expected = req.over_limit and resp.status == 400
                return Outcome("rejected" if expected else "failed", [],
                               time.monotonic() - start, f"HTTP {resp.status}: {text}")
            if req.over_limit:
                return Outcome("failed", [], time.monotonic() - start,
                               "a prompt over the limit was accepted")
            if not req.stream:
                data = await resp.json()
                tokens = _token_ids(data["choices"][0])
                return Outcome("ok", tokens, time.monotonic() - start)
            chunks = 0
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    return Outcome("failed", tokens, time.monotonic() - start,
                                   str(chunk["error"])[:300])
                if chunk.get("choices"):
                    tokens += _token_ids(chunk["choices"][0])
                chunks += 1
                if req.disconnect_after is not None and chunks >= req.disconnect_after:
                    resp.close()  # the client goes away; the server must abort the request
                    return Outcome("disconnected", tokens, time.monotonic() - start)
            return Outcome("ok", tokens, time.monotonic() - start)
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as e:
        return Outcome("failed", tokens, time.monotonic() - start, f"{type(e).__name__}: {e}")


async def run_load(url: str, model: str, requests: list[Request], concurrency: int,
                   progress: list[int], report_every: float = 30.0, with_xargs: bool = True,
                   on_done: Callable[[int], None] | None = None) -> list[Outcome]:
    import aiohttp

    outcomes: list[Outcome | None] = [None] * len(requests)
    queue = iter(range(len(requests)))
    start = time.monotonic()
    last = [start]

    async def client(session: Any) -> None:
        for i in queue:
            outcomes[i] = await send(session, url, model, requests[i], with_xargs)
            progress[0] += 1
            if on_done is not None:
                on_done(progress[0])
            now = time.monotonic()
            if now - last[0] >= report_every:
                last[0] = now
                failed = sum(1 for o in outcomes if o is not None and o.status == "failed")
                print(f"  {progress[0]}/{len(requests)} done in {now - start:.0f} s, "
                      f"{failed} failed", flush=True)

    # A fresh connection per request: a reused keep-alive connection that the server closes as
    # idle (uvicorn: after 5 s) while the client sends on it fails with ServerDisconnectedError,
    # a race of HTTP keep-alive under a stalled machine, not a fault of the server.
    connector = aiohttp.TCPConnector(limit=concurrency + 4, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return [o for o in outcomes if o is not None]


class HealthPoller(Periodic):
    """GET /health every `interval` seconds in a thread: every answer and its latency."""

    def __init__(self, url: str, interval: float = 1.0, timeout: float = 10.0) -> None:
        super().__init__(interval)
        self.url, self.timeout = url, timeout
        self.results: list[tuple[bool, float]] = []

    def tick(self) -> None:
        self.results.append(health(self.url, self.timeout))


# --- the run -------------------------------------------------------------------------------------


def settle(url: str, timeout: float = 120) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics once no request is running or waiting and the lookahead state is empty (or the
    timeout passed: the figures then show what is left)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        busy = total(samples, "vllm:num_requests_running") + \
            total(samples, "vllm:num_requests_waiting")
        live = total(samples, "vllm:lookahead_live_requests")
        if (busy == 0 and live == 0) or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def signal_processes(server: Server, signum: int) -> None:
    for proc in server_processes(server).values():
        with contextlib.suppress(Exception):
            proc.send_signal(signum)


def soak(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model or str(tiny_model())
    config = json.loads((Path(model) / "config.json").read_text())
    vocab = int(config["vocab_size"])
    spec = None if args.no_spec else json.loads(args.speculative_config)
    k = int(spec["num_speculative_tokens"]) if spec else 0
    extra = ["--max-model-len", str(args.max_model_len), "--max-num-seqs",
             str(args.concurrency)]
    if args.num_gpu_blocks:
        extra += ["--num-gpu-blocks-override", str(args.num_gpu_blocks), "--block-size", "32"]
    extra += args.server_arg
    requests = make_requests(args.requests, args.seed, vocab, args.max_model_len, max(k, 1),
                             args.disconnect_rate, args.max_output)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    tm_dir = Path(args.tracemalloc) if args.tracemalloc else None
    print(f"soak: {args.requests} requests, {args.concurrency} in flight, disconnect rate "
          f"{args.disconnect_rate}, speculation {json.dumps(spec)}, server args {extra}; logs "
          f"in {workdir}", flush=True)
    t0 = time.monotonic()
    server = start_server(model, spec, extra, workdir / "server.log", tm_dir)
    startup_s = time.monotonic() - t0
    name = "model"
    with urllib.request.urlopen(f"{server.url}/v1/models") as r:
        name = json.loads(r.read())["data"][0]["id"]
    result: dict[str, Any] = {"requests": args.requests, "concurrency": args.concurrency,
                              "disconnect_rate": args.disconnect_rate, "speculative_config": spec,
                              "server_args": extra, "startup_s": round(startup_s, 1)}
    try:
        progress = [0]
        warmup = max(0, min(args.warmup, len(requests)))
        with HealthPoller(server.url) as poller, MemorySampler(server, progress) as memory:
            load_start = time.monotonic()

            def after_warmup(done: int) -> None:
                if tm_dir is not None and done == warmup:  # tracemalloc's first snapshot
                    signal_processes(server, signal.SIGUSR2)

            outcomes = asyncio.run(run_load(server.url, name, requests, args.concurrency,
                                            progress, report_every=args.report_every,
                                            on_done=after_warmup))
            load_s = time.monotonic() - load_start
            load_end = time.monotonic() - memory.start
            if tm_dir is not None:
                signal_processes(server, signal.SIGUSR2)
            samples = settle(server.url)
            # Idle after the load: does memory come back down?
            time.sleep(args.idle_after)
        if tm_dir is not None:  # each process writes its own report when it gets to it
            deadline = time.monotonic() + 180
            while len(list(tm_dir.glob("pid-*.txt"))) < len(memory.procs) and \
                    time.monotonic() < deadline:
                time.sleep(1)
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        failures = [f"#{i}: {o.detail}" for i, o in enumerate(outcomes) if o.status == "failed"]
        budget = label(samples, "vllm:lookahead_config_info", "shared_pool_tokens")
        if budget is None and spec is not None:  # not a label of the info metric: the config's
            from vllm_lookahead.config import LookaheadConfig

            budget = str(spec.get("lookahead", {}).get(
                "shared_pool_tokens", spec.get("lookahead_shared_pool_tokens",
                                               LookaheadConfig().shared_pool_tokens)))
        tokens_out = sum(len(o.tokens) for o in outcomes)
        result.update({
            "load_s": round(load_s, 1), "outcomes": counts, "failures": failures[:20],
            "generated_tokens": tokens_out,
            "tokens_per_s": round(tokens_out / load_s, 1) if load_s else None,
            "health_checks": len(poller.results),
            "health_failures": sum(1 for ok, _ in poller.results if not ok),
            "health_max_latency_s": round(max((t for _, t in poller.results), default=0), 3),
            "live_requests_after": total(samples, "vllm:lookahead_live_requests"),
            "shared_tokens_after": total(samples, "vllm:lookahead_shared_tokens"),
            "shared_pool_tokens": int(budget) if budget else None,
            "requests_running_after": total(samples, "vllm:num_requests_running"),
            "preemptions": total(samples, "vllm:num_preemptions_total"),
            "spec_accepted": total(samples, "vllm:spec_decode_num_accepted_tokens_total"),
            "spec_drafted": total(samples, "vllm:spec_decode_num_draft_tokens_total"),
            "lookahead_resyncs": total(samples, "vllm:lookahead_resyncs_total"),
            "rss": memory.report(warmup, load_end),
            "rss_samples": [(round(t, 1), d, {k: round(v, 1) for k, v in m.items()})
                            for t, d, m in memory.samples],
        })
        if args.verify:
            result["verify"] = verify(args, model, extra, requests, outcomes, workdir)
    finally:
        stop_server(server)
    return result


def verify(args: argparse.Namespace, model: str, extra: list[str], requests: list[Request],
           outcomes: list[Outcome], workdir: Path) -> dict[str, Any]:
    """Replay the completed greedy requests on a server without speculation; count mismatches."""
    picked = [(r, o) for r, o in zip(requests, outcomes, strict=True)
              if o.status == "ok" and r.greedy]
    replay = [dataclasses.replace(r, stream=False, disconnect_after=None) for r, _ in picked]
    print(f"verify: replaying {len(replay)} greedy requests without speculation", flush=True)
    server = start_server(model, None, extra, workdir / "baseline.log")
    try:
        with urllib.request.urlopen(f"{server.url}/v1/models") as r:
            name = json.loads(r.read())["data"][0]["id"]
        # No lookahead options: the baseline server has no lookahead to take them.
        expected = asyncio.run(run_load(server.url, name, replay, args.concurrency, [0],
                                        report_every=args.report_every, with_xargs=False))
    finally:
        stop_server(server)
    mismatches = [r.index for (r, o), e in zip(picked, expected, strict=True)
                  if e.status != "ok" or e.tokens != o.tokens]
    return {"compared": len(picked), "mismatches": len(mismatches),
            "mismatched_requests": mismatches[:20]}


def summary(result: dict[str, Any]) -> Iterator[str]:
    yield (f"requests {result['requests']} ({result['outcomes']}), {result['concurrency']} in "
           f"flight, load {result['load_s']} s, {result['generated_tokens']} tokens "
           f"({result['tokens_per_s']} tokens/s), server start {result['startup_s']} s")
    yield (f"/health: {result['health_checks']} checks, {result['health_failures']} failed, "
           f"slowest {result['health_max_latency_s']} s")
    yield (f"after: live requests {result['live_requests_after']:.0f}, running "
           f"{result['requests_running_after']:.0f}, shared tokens "
           f"{result['shared_tokens_after']:.0f} of {result['shared_pool_tokens']}, "
           f"preemptions {result['preemptions']:.0f}, resyncs {result['lookahead_resyncs']:.0f}, "
           f"accepted/drafted {result['spec_accepted']:.0f}/{result['spec_drafted']:.0f}")
    for role, m in result["rss"].items():
        yield (f"RSS {role}: start {m['start_mib']:.0f} MiB, mid {m['mid_mib']:.0f}, end "
               f"{m['end_mib']:.0f} (max {m['max_mib']:.0f}), after idling "
               f"{m['idle_end_mib']:.0f}; second-half slope "
               f"{m['slope_mib_per_min']:+.2f} MiB/min, "
               f"{m['slope_mib_per_1000_requests']:+.1f} MiB/1000 requests")
    if "verify" in result:
        v = result["verify"]
        yield f"verify: {v['compared']} greedy requests replayed, {v['mismatches']} differ"
    for failure in result["failures"]:
        yield f"failed {failure}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--disconnect-rate", type=float, default=0.1)
    p.add_argument("--max-output", type=int, default=160, help="largest max_tokens drawn")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--num-gpu-blocks", type=int, default=0,
                   help="KV cache blocks of 32 tokens (small: requests are preempted)")
    p.add_argument("--speculative-config", default=json.dumps(DEFAULT_SPEC))
    p.add_argument("--no-spec", action="store_true", help="the same load without speculation")
    p.add_argument("--verify", action="store_true",
                   help="replay completed greedy requests without speculation and compare")
    p.add_argument("--model", help="default: the tests' tiny random Llama")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for the server (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=100,
                   help="completed requests before the memory figures start")
    p.add_argument("--idle-after", type=float, default=20.0,
                   help="seconds of memory samples after the load")
    p.add_argument("--report-every", type=float, default=60.0)
    p.add_argument("--tracemalloc", metavar="DIR")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = soak(args)
    for line in summary(result):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
