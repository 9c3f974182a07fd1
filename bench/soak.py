"""Soak: many questions across many conversations through the generic API, with a slow stand-in model.

The daemon runs in a child process with its default queue bounds (no per-sender rate) and
an engine that takes ``--engine-ms`` per answer, up to ``max_batch`` at once. This process plays
the callers: one task per conversation posting its questions one after another (the next once
the last was acknowledged; on 429 "busy" it waits as Retry-After says, jittered, or
``--busy-wait-ms``, and posts it again), and a callback receiver on loopback that records every
answer delivered.

Prints throughput, time to acknowledge (p50/p99), the daemon's peak RSS, and what must be zero:
lost answers (acknowledged, never delivered), duplicated answers (delivered twice), and
per-conversation order violations (an answer delivered before the answer to an earlier question).

    python bench/soak.py [--questions 10000] [--conversations 500] [--engine-ms 20] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import random
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from multiprocessing.connection import Connection

import aiohttp
from aiohttp import web
from stand_in import StandInEngine

from bot.config import parse
from bot.daemon import Daemon

TOKEN = "soak"


async def _serve(pipe: Connection, delay_s: float) -> None:
    with tempfile.TemporaryDirectory(prefix="imsight-soak-") as tmp:
        # Default bounds, but no per-sender rate: it would pace the whole run at senders x 10/min.
        config = parse({"server": {"port": 0}, "storage": {"data_dir": tmp},
                        "limits": {"questions_per_sender_per_minute": 0},
                        "adapters": {"webhook": {"token": TOKEN, "allowed_callback_hosts": ["127.0.0.1"]}}},
                       environ={})
        engine = StandInEngine(delay_s, config.engine.max_batch)
        async with Daemon(config, engine=engine) as daemon:
            pipe.send((daemon.url, config.limits.model_dump()))
            await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # until told to stop
        pipe.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB


def _server_process(pipe: Connection, delay_s: float) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_serve(pipe, delay_s))


class Callers:
    def __init__(self, url: str, hook_url: str, questions: int, conversations: int, busy_wait_s: float | None
                 ) -> None:
        self.url, self.hook_url = url, hook_url
        self.busy_wait_s = busy_wait_s
        self.plan = {f"c{n}": [q for q in range(questions) if q % conversations == n] for n in range(conversations)}
        self.acked: dict[str, tuple[str, int]] = {}  # job id -> (conversation, question number)
        self.ack_s: list[float] = []
        self.busy = 0
        self.delivered: dict[str, list[str]] = defaultdict(list)  # job id -> answers received
        self.arrivals: list[str] = []  # job ids, in the order their answers came
        self.arrived = asyncio.Event()

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body["type"] in ("job.done", "job.failed"):
            self.delivered[body["job_id"]].append(body["type"])
            self.arrivals.append(body["job_id"])
            self.arrived.set()
        return web.Response()

    def order_violations(self) -> int:
        """Answers that came before the answer to an earlier question of the same conversation."""
        seen: dict[str, int] = {}
        violations = 0
        for job in self.arrivals:
            conversation, number = self.acked.get(job, ("?", -1))
            violations += number < seen.get(conversation, -1)
            seen[conversation] = max(number, seen.get(conversation, -1))
        return violations

    async def conversation(self, http: aiohttp.ClientSession, name: str) -> None:
        for number in self.plan[name]:
            body = {"conversation_id": name, "text": f"question {number}", "callback_url": self.hook_url,
                    "sender": {"id": f"user-{number % 97}"}}
            while True:
                start = time.perf_counter()
                async with http.post(f"{self.url}/api/v1/messages", json=body,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                    reply = await resp.json()
                    status, retry_after = resp.status, float(resp.headers.get("Retry-After", "1"))
                if status == 429:
                    self.busy += 1
                    wait = self.busy_wait_s if self.busy_wait_s is not None else retry_after * random.uniform(0.5, 1.5)
                    await asyncio.sleep(wait)
                    continue
                assert status == 202, (status, reply)
                self.ack_s.append(time.perf_counter() - start)
                self.acked[reply["job_id"]] = (name, number)
                break


async def _run(args: argparse.Namespace, url: str, limits: dict[str, object]) -> None:
    app = web.Application()
    callers: Callers
    app.router.add_post("/hook", lambda request: callers.hook(request))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    hook_url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    busy_wait_s = None if args.busy_wait_ms is None else args.busy_wait_ms / 1000
    callers = Callers(url, hook_url, args.questions, args.conversations, busy_wait_s)
    print(f"{args.questions} questions, {args.conversations} conversations, engine {args.engine_ms} ms per answer; "
          f"daemon limits {limits}")
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(callers.conversation(http, c) for c in callers.plan)), args.timeout)
        posted = time.perf_counter() - start
        deadline = time.monotonic() + args.timeout
        while len(callers.delivered) < len(callers.acked) and time.monotonic() < deadline:
            callers.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(callers.arrived.wait(), 1.0)
        await asyncio.sleep(1.0)  # a late duplicate would show by now
        elapsed = time.perf_counter() - start
    await runner.cleanup()

    lost = len(set(callers.acked) - set(callers.delivered))
    duplicated = sum(len(v) - 1 for v in callers.delivered.values() if len(v) > 1)
    violations = callers.order_violations()
    ack_ms = sorted(s * 1000 for s in callers.ack_s)
    print(f"all acknowledged after {posted:.1f} s; all answered after {elapsed:.1f} s")
    print(f"throughput               {len(callers.delivered) / elapsed:8.1f} answers/s")
    print(f"time to acknowledge p50  {statistics.median(ack_ms):8.2f} ms")
    print(f"time to acknowledge p99  {statistics.quantiles(ack_ms, n=100)[98]:8.2f} ms")
    waited = "as Retry-After says" if args.busy_wait_ms is None else f"after {args.busy_wait_ms} ms"
    print(f"busy (429) answers       {callers.busy:8d}  (posted again {waited})")
    print(f"lost answers             {lost:8d}")
    print(f"duplicated answers       {duplicated:8d}")
    print(f"order violations         {violations:8d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=10_000)
    parser.add_argument("--conversations", type=int, default=500)
    parser.add_argument("--engine-ms", type=float, default=20)
    parser.add_argument("--busy-wait-ms", type=float, help="on 429, wait this long (default: Retry-After)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds; the run stops by itself")
    parser.add_argument("--quick", action="store_true", help="a few seconds on a small load (the test suite runs it)")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.conversations, args.engine_ms, args.timeout = 200, 20, 2, 60
    ours, theirs = mp.Pipe()
    server = mp.get_context("spawn").Process(target=_server_process, args=(theirs, args.engine_ms / 1000))
    server.start()
    try:
        url, limits = ours.recv()
        asyncio.run(_run(args, url, limits))
    finally:
        ours.send("stop")
        if ours.poll(60):
            print(f"daemon peak RSS          {ours.recv() / 2**20:8.1f} MiB")
        server.join(30)


if __name__ == "__main__":
    main()
