"""The ``imsight`` command: run, doctor, ask, download-model, tiny-model, demo, history purge."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from bot.logs import TEXT_FORMAT
from core.errors import ConfigError, ImsightError

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    return _run_command(build_parser().parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imsight", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the daemon")
    run.add_argument("--config", type=Path, default=Path("config.toml"))

    ask = commands.add_parser("ask", help="answer one question about images, without a daemon")
    ask.add_argument("--config", type=Path, help="engine and image settings (defaults if absent)")
    ask.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    ask.add_argument("--question", "-q", required=True)

    download = commands.add_parser("download-model", help="fetch a model from the Hugging Face hub (connected hosts)")
    download.add_argument("model", nargs="?", help="hub id; default: [engine] model from the config")
    download.add_argument("--config", type=Path, help="for [engine] model and cache_dir (defaults if absent)")
    download.add_argument("--local-dir", type=Path, help="write a plain directory here, to copy to an offline host")
    download.add_argument("--revision", help="branch, tag or commit; default: main")

    tiny = commands.add_parser("tiny-model", help="write a tiny random test model (answers are noise)")
    tiny.add_argument("dir", type=Path)

    commands.add_parser("demo", help="start a daemon on a tiny test model and ask it two questions")

    doctor = commands.add_parser("doctor", help="check this host and the config; each failure with its fix")
    doctor.add_argument("--config", type=Path, default=Path("config.toml"))
    doctor.add_argument("--online", action="store_true", help="also try the model server and platform credentials")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")

    history = commands.add_parser("history", help="manage stored history")
    history_commands = history.add_subparsers(dest="history_command", required=True)
    purge = history_commands.add_parser(
        "purge", help="delete stored messages, answers and images; never what a waiting question needs")
    purge.add_argument("--config", type=Path, default=Path("config.toml"), help="for [storage] data_dir")
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("--conversation", metavar="ID", help="one chat (its chat or conversation id)")
    which.add_argument("--older-than", type=float, metavar="DAYS", help="everything older than DAYS days")
    purge.add_argument("--platform", help="with --conversation: only this platform's chat (telegram, api, ...)")
    return parser


def _run_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format=TEXT_FORMAT)
    for chatty in ("httpx", "httpx2", "httpcore"):  # one line per HTTP request of huggingface_hub
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        if args.command == "run":
            return _run(args.config, verbose=args.verbose)
        if args.command == "ask":
            return _ask(args.config, args.images, args.question)
        if args.command == "download-model":
            from bot.download import download_model

            return download_model(args.config, args.model, args.local_dir, args.revision)
        if args.command == "tiny-model":
            return _tiny_model(args.dir)
        if args.command == "doctor":
            return _doctor(args.config, online=args.online, as_json=args.json)
        if args.command == "history":
            return asyncio.run(_purge(args.config, args.conversation, args.platform, args.older_than))
        from bot.demo import demo

        return asyncio.run(demo())
    except ConfigError as exc:
        print(f"imsight: config error: {exc}", file=sys.stderr)
        return 2
    except ImsightError as exc:
        print(f"imsight: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _offline_unless_allowed(allow_download: bool) -> None:
    # Set before transformers is imported: huggingface_hub reads it once, at import.
    if not allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _run(path: Path, *, verbose: bool) -> int:
    from bot.config import load
    from bot.daemon import serve
    from bot.logs import setup_logging

    config = load(path)
    setup_logging("DEBUG" if verbose else config.logging.level, config.logging.format)
    _offline_unless_allowed(config.engine.allow_download)
    asyncio.run(serve(config))
    return 0


def _ask(path: Path | None, images: list[Path], question: str) -> int:
    from bot.config import Config, load
    from bot.daemon import build_engine, image_limits
    from core.engine import GenerationLimits, PreparedImage
    from core.images import prepare, sha256

    config = load(path) if path is not None else Config()
    _offline_unless_allowed(config.engine.allow_download)
    limits = image_limits(config)
    prepared = []
    for image in images:
        try:
            data = image.read_bytes()
        except OSError as exc:
            raise ImsightError(f"cannot read {image}: {exc.strerror}") from None
        prepared.append(PreparedImage(sha256(data), prepare(data, limits)))

    async def answer() -> None:
        engine = build_engine(config)
        await engine.start()
        try:
            generation = GenerationLimits(max_new_tokens=config.engine.max_new_tokens)
            async for chunk in engine.answer(prepared, [], question, generation):
                print(chunk, end="", flush=True)
            print()
        finally:
            await engine.stop()

    asyncio.run(answer())
    return 0


async def _purge(path: Path, conversation: str | None, platform: str | None, older_than: float | None) -> int:
    import time

    from bot.config import load
    from bot.files import ImageFiles
    from bot.retention import purge
    from bot.store import Store

    if older_than is not None and older_than < 0:
        raise ConfigError("--older-than: must be 0 or more days")
    config = load(path)
    data_dir = config.storage.data_dir
    if not (data_dir / "imsight.db").exists():
        raise ImsightError(f"no history at {data_dir} ([storage] data_dir)")
    async with Store.open(data_dir / "imsight.db", lock_timeout_s=config.storage.lock_timeout_seconds) as store:
        before = None if older_than is None else time.time() - older_than * 86_400
        purged = await purge(store, ImageFiles(data_dir / "images"), platform=platform, chat_id=conversation,
                             before=before)
    print(f"deleted {purged.messages} message(s) and {len(purged.orphans)} image file(s)")
    if purged.kept:
        print(f"kept {purged.kept} message(s) that questions still waiting for an answer need")
    return 0


def _doctor(path: Path, *, online: bool, as_json: bool) -> int:
    from bot.doctor import diagnose, report

    checks = diagnose(path, online=online)
    print(report(checks, as_json=as_json))
    return 1 if any(c.status == "fail" for c in checks) else 0


def _tiny_model(out: Path) -> int:
    from core.tiny_model import build_tiny_model

    build_tiny_model(out)
    print(f"wrote a tiny random test model to {out} (plumbing tests only: its answers are noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
