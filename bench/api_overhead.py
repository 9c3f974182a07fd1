"""The daemon's own cost per request of POST /api/v1/messages, against a bare aiohttp handler.

Both servers run in one child process on loopback; the load comes from this process. The daemon
runs with an instant in-memory engine, so what is measured is everything but the model: auth,
parsing, image validation, the content-addressed file write, the SQLite transaction (fsync'd,
synchronous=FULL) and, for questions, queueing and the background worker.

    python bench/api_overhead.py [--requests 2000] [--concurrency 8] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import multiprocessing as mp
import statistics
import tempfile
import time
from multiprocessing.connection import Connection

import aiohttp
from aiohttp import web
from PIL import Image
from stand_in import StandInEngine

from bot.config import parse
from bot.daemon import Daemon


async def _bare(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({"status": "ok", "conversation_id": body.get("conversation_id")}, status=202)


async def _serve(pipe: Connection) -> None:
    with tempfile.TemporaryDirectory(prefix="imsight-bench-") as tmp:
        # No queue bounds or sender rate: this measures the cost of a request, not the refusals.
        limits = {"max_queued": 0, "max_queued_per_chat": 0, "questions_per_sender_per_minute": 0}
        config = parse({"server": {"port": 0}, "storage": {"data_dir": tmp}, "limits": limits,
                        "adapters": {"webhook": {"token": "bench"}}}, environ={})
        app = web.Application(client_max_size=32 * 2**20)
        app.router.add_post("/api/v1/messages", _bare)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        bare_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with Daemon(config, engine=StandInEngine()) as daemon:
            pipe.send((daemon.url, bare_url))
            await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # until told to stop
        await runner.cleanup()


def _server_process(pipe: Connection) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(pipe))


def _screenshots(n: int) -> list[str]:
    """Distinct small PNGs, so every request stores a new image."""
    out = []
    for i in range(n):
        image = Image.new("RGB", (320, 200), (i % 256, (i // 256) % 256, 128))
        buf = io.BytesIO()
        image.save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


async def _load(url: str, bodies: list[dict[str, object]], concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    headers = {"Authorization": "Bearer bench"}

    async def client(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            async with http.post(f"{url}/api/v1/messages", json=body, headers=headers) as resp:
                await resp.read()
                assert resp.status in (200, 202), resp.status
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(bodies) / elapsed, latencies


def _ms(values: list[float], percentile: int) -> float:
    return statistics.quantiles(values, n=100)[percentile - 1] * 1000


async def _run(requests: int, concurrency: int, daemon_url: str, bare_url: str) -> None:
    images = _screenshots(2 * requests)
    cases = {
        "stored image": lambda n, tag: {"conversation_id": f"{tag}{n % 50}", "images": [{"data": images[n]}]},
        "queued question": lambda n, tag: {"conversation_id": f"{tag}{n % 50}", "text": f"question {n}?"},
    }
    print(f"{requests} requests per case, {concurrency} concurrent, loopback, one process each side\n")
    print(f"{'case':<16} {'server':<7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, make in cases.items():
        results = {}
        for target, url in (("bare", bare_url), ("daemon", daemon_url)):
            offset = requests if target == "daemon" else 0  # fresh images for the daemon
            await _load(url, [make(offset + n, "warm") for n in range(min(100, requests))], concurrency)
            rate, lat = await _load(url, [make(offset + n, target) for n in range(requests)], concurrency)
            results[target] = (rate, _ms(lat, 50), _ms(lat, 99))
            print(f"{name:<16} {target:<7} {rate:8.0f} {results[target][1]:8.2f} {results[target][2]:8.2f}")
        (bare_rate, bare_p50, _), (rate, p50, _) = results["bare"], results["daemon"]
        print(f"{'':<16} ratio   {bare_rate / rate:7.1f}x slower, p50 {p50 / bare_p50:.1f}x, "
              f"daemon cost {(p50 - bare_p50):.2f} ms per request at p50\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a few seconds on a small load (the test suite runs it)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.concurrency = 60, 4
    ours, theirs = mp.Pipe()
    server = mp.get_context("spawn").Process(target=_server_process, args=(theirs,))
    server.start()
    try:
        daemon_url, bare_url = ours.recv()
        asyncio.run(_run(args.requests, args.concurrency, daemon_url, bare_url))
    finally:
        ours.send("stop")
        server.join(30)


if __name__ == "__main__":
    main()
