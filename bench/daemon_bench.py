"""The engine as a chat sees it: ``imsight run`` in a child process, questions through the HTTP API
with ``wait: true``, wall-clock times as the caller measures them.

Prints: one answer's time (a 1024x768 screenshot and a question); a follow-up about the same
screenshot in the same conversation (its prefill is the cached prefix's tail); 8 chats asking
within one second, each one's time against the single answer's (target: all within 1.3x); and how
long a restart on the same data directory takes to be ready (the compiled decode step is cached).

    python bench/daemon_bench.py --model-dir /path/to/model [--quantization nf4] [--new-tokens 64]
    python bench/daemon_bench.py --quick          # the tiny test model on the CPU (figures mean nothing)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import aiohttp
from screens import screenshot_image

ROOT = Path(__file__).resolve().parents[1]


def screenshot(n: int) -> str:
    out = io.BytesIO()
    screenshot_image(n).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def ask(http: aiohttp.ClientSession, url: str, body: dict[str, object]) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    async with http.post(f"{url}/api/v1/messages", json={**body, "wait": True}) as resp:
        answer = await resp.json()
    if resp.status != 200 or answer.get("status") != "done":
        raise SystemExit(f"the daemon answered {resp.status}: {answer}")
    return time.perf_counter() - started, answer


async def three(http: aiohttp.ClientSession, url: str, body: Callable[[int], dict[str, object]]) -> tuple[float, str]:
    """Three questions one after another: the median seconds, and each time with its answer's length
    (random weights end answers at random, at an end token)."""
    times = []
    for n in range(3):
        seconds, answer = await ask(http, url, body(n))
        times.append((seconds, len(str(answer.get("answer", "")))))
    return sorted(times)[1][0], ", ".join(f"{t * 1e3:.0f} ms/{c} chars" for t, c in times)


async def measure(url: str) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        await ask(http, url, {"conversation_id": "warm", "text": "warm up", "images": [{"data": screenshot(0)}]})
        firsts = await three(http, url, lambda n: {"conversation_id": f"one{n}", "text": "What does this error mean?",
                                                   "images": [{"data": screenshot(10 + n)}]})
        follows = await three(http, url, lambda n: {"conversation_id": f"one{n}", "text": "And how do I fix it?"})
        one, follow = firsts[0], follows[0]
        print(f"one answer (screenshot + question): {one * 1e3:.0f} ms (median of 3: {firsts[1]})")
        print(f"follow-up about the same screenshot: {follow * 1e3:.0f} ms ({follow / one:.0%} of the first; "
              f"{follows[1]})")

        async def chat(n: int) -> float:
            await asyncio.sleep(n / 8)  # 8 chats within one second
            seconds, _ = await ask(http, url, {"conversation_id": f"chat{n}", "text": f"What is wrong here? ({n})",
                                               "images": [{"data": screenshot(100 + n)}]})
            return seconds

        times = await asyncio.gather(*[chat(n) for n in range(8)])
        print("8 chats within one second: " + ", ".join(f"{t * 1e3:.0f}" for t in times) + " ms each")
        print(f"  slowest = {max(times) / one:.2f}x one answer (target <= 1.3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="the tiny test model, a few seconds (the tests run it)")
    parser.add_argument("--no-restart", action="store_true", help="only the first start")
    parser.add_argument("--unpacked-weights", action="store_true", help="[engine] unpacked_weights = true (int4)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="imsight-daemon-bench-") as tmp:
        model = args.model_dir
        if args.quick or model is None:
            from core.tiny_model import build_tiny_model

            model = build_tiny_model(Path(tmp) / "tiny-model")
            args.new_tokens = min(args.new_tokens, 8)
        port = free_port()
        config = Path(tmp) / "config.toml"
        config.write_text(f'[server]\nport = {port}\n[storage]\ndata_dir = "data"\n'
                          f'[engine]\nmodel_path = "{model}"\nquantization = "{args.quantization}"\n'
                          f'max_new_tokens = {args.new_tokens}\n'
                          f'unpacked_weights = {str(args.unpacked_weights).lower()}\n'
                          '[limits]\nmax_queued_per_chat = 0\nquestions_per_sender_per_minute = 0\n')
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        # Twice on the same data_dir: the first start compiles (cache empty), the restart reuses it.
        for label, asking in (("first start", True), ("restart, same model and settings", False)):
            _daemon(config, env, port, label, model, args.new_tokens, asking)
            if args.no_restart:
                break


def _daemon(config: Path, env: dict[str, str], port: int, label: str, model: Path, new_tokens: int,
            asking: bool) -> None:
    spawned = datetime.now()  # against the log's timestamps: where the time to ready goes
    # The log to a file: a pipe nobody reads until the end fills and stalls the daemon.
    log_file = config.with_name(f"daemon-{'first' if asking else 'restart'}.log")
    with log_file.open("w") as log_out:
        daemon = subprocess.Popen([sys.executable, "-m", "bot.cli", "run", "--config", str(config)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=log_out, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        asyncio.run(_ready(url, daemon))
        print(f"{label}: imsight run ready in {time.perf_counter() - started:.1f} s "
              f"(model {model.name}, {new_tokens}-token answers; started at {spawned:%H:%M:%S})")
        asyncio.run(_until_compiled(url, started))
        if asking:
            asyncio.run(measure(url))
    finally:
        if daemon.poll() is not None:  # it exited on its own: all of its log says why
            print(log_file.read_text()[-6000:])
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        for n, line in enumerate(log_file.read_text().splitlines()):
            if n == 0 or any(word in line for word in ("loaded", "quantized", "warmed up", "KV slots", "CUDA graph",
                                                       "decoding eagerly", "decode step", "compil", "ready")):
                print(f"  daemon log ({since(spawned, line)}):", line)
            elif "chat chat" in line and " in " in line:  # the 8 chats' jobs: each one's first token, and how
                print("  8 chats:", line.split(" job ", 1)[-1])


def since(spawned: datetime, line: str) -> str:
    """``+seconds`` from the daemon's spawn to a log line's timestamp (the first line's: its imports and config),
    or ``?`` for a line without one (a traceback's)."""
    try:
        logged = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return "?"
    return f"+{(logged - spawned).total_seconds():.1f} s"


async def _until_compiled(url: str, started: float) -> None:
    """An answer at once (nothing compiled yet), then wait until the engine has captured and compiled all it will
    (GPU only), saying when each part was done."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        seconds, _ = await ask(http, url, {"conversation_id": "early", "text": "What does this error mean?",
                                           "images": [{"data": screenshot(1)}]})
        print(f"  an answer right after ready: {seconds * 1e3:.0f} ms")
        # Parts that imsight's own decoder layers do not compile stay 0: "settled" says when all is done.
        waiting = ["decode_compiled", "prompt_graphs_compiled", "tail_graphs_compiled", "vision_compiled",
                   "prefill_compiled", "prefill_together_compiled", "settled"]
        for _ in range(1200):
            async with http.get(f"{url}/metrics") as resp:
                metrics = await resp.text()
            if "gpu_memory_allocated_bytes" not in metrics:
                break
            for name in list(waiting):
                if f'name="{name}"}} 1.0' in metrics:
                    waiting.remove(name)
                    print(f"  {name.replace('_', ' ')} {time.perf_counter() - started:.1f} s after the start")
            if "settled" not in waiting:
                break
            await asyncio.sleep(0.5)


async def _ready(url: str, daemon: subprocess.Popen[str]) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(3000):
            if daemon.poll() is not None:
                raise SystemExit("imsight run exited (its log is above)")
            try:
                async with http.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("imsight run was not ready within 5 minutes")


if __name__ == "__main__":
    main()
