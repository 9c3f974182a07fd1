"""The ``imsight`` command: run, doctor, ask, download-model, tiny-model, demo, history purge."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import traceback
from pathlib import Path

from bot.logs import TEXT_FORMAT
from core.errors import ConfigError, ImsightError

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    return _run_command(build_parser().parse_args(argv))


def _days(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more days")
    return value


def build_parser() -> argparse.ArgumentParser:
    # -v works before or after the command (imsight -v run, imsight run -v); SUPPRESS keeps the
    # subcommand's default from overwriting a -v given before it.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logging, and tracebacks with errors")
    parser = argparse.ArgumentParser(prog="imsight", description=__doc__, parents=[verbose])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, parents=[verbose])

    config_help = "the config file (default: ./config.toml)"
    run = command("run", "run the daemon")
    run.add_argument("--config", type=Path, default=Path("config.toml"), help=config_help)

    ask = command("ask", "answer one question about images, without a daemon")
    ask.add_argument("--config", type=Path, help="engine and image settings (defaults if absent)")
    ask.add_argument("--model-path", type=Path, help="a local model directory (wins over the config's)")
    ask.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    ask.add_argument("--question", "-q", required=True)

    download = command("download-model", "fetch a model from the Hugging Face hub (connected hosts)")
    download.add_argument("model", nargs="?", help="hub id; default: [engine] model from the config")
    download.add_argument("--config", type=Path, help="for [engine] model and cache_dir (defaults if absent)")
    download.add_argument("--local-dir", type=Path, help="write a plain directory here, to copy to an offline host")
    download.add_argument("--revision", help="branch, tag or commit; default: main")

    tiny = command("tiny-model", "write a tiny random test model (answers are noise)")
    tiny.add_argument("dir", type=Path, nargs="?", help="where to write it")
    tiny.add_argument("--config", type=Path,
                      help="instead of DIR: the config's [engine] model_path, when it names a tiny-model "
                           "directory that is not there yet (what `make run` does)")

    command("demo", "start a daemon on a tiny test model and ask it two questions")

    doctor = command("doctor", "check this host and the config; each failure with its fix")
    doctor.add_argument("--config", type=Path, default=Path("config.toml"), help=config_help)
    doctor.add_argument("--online", action="store_true", help="also try the model server and platform credentials")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")

    history = command("history", "manage stored history")
    history_commands = history.add_subparsers(dest="history_command", required=True)
    purge = history_commands.add_parser(
        "purge", parents=[verbose],
        help="delete stored messages, answers and images; never what a waiting question needs")
    purge.add_argument("--config", type=Path, default=Path("config.toml"), help="for [storage] data_dir")
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("--conversation", metavar="ID", help="one chat (its chat or conversation id)")
    which.add_argument("--older-than", type=_days, metavar="DAYS", help="everything older than DAYS days")
    purge.add_argument("--platform", help="with --conversation: only this platform's chat (telegram, api, ...)")
    return parser


def _run_command(args: argparse.Namespace) -> int:
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=TEXT_FORMAT)
    for chatty in ("httpx", "httpx2", "httpcore"):  # one line per HTTP request of huggingface_hub
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        if args.command == "run":
            return _run(args.config, verbose=verbose)
        if args.command == "ask":
            return _ask(args.config, args.model_path, args.images, args.question)
        if args.command == "download-model":
            from bot.download import download_model

            return download_model(args.config, args.model, args.local_dir, args.revision)
        if args.command == "tiny-model":
            return _tiny_model(args.dir, args.config)
        if args.command == "doctor":
            return _doctor(args.config, online=args.online, as_json=args.json)
        if args.command == "history":
            return asyncio.run(_purge(args.config, args.conversation, args.platform, args.older_than))
        from bot.demo import demo

        return asyncio.run(demo())
    except ConfigError as exc:
        return _fail(exc, "config error: ", verbose=verbose, status=2)
    except ImsightError as exc:
        return _fail(exc, "", verbose=verbose)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line, never a library's text with a token in it, unless asked for
        return _fail(exc, f"unexpected error ({type(exc).__name__}); run with -v for the traceback: ",
                     verbose=verbose)


def _fail(exc: BaseException, prefix: str, *, verbose: bool, status: int = 1) -> int:
    """Print ``exc`` as one line (its traceback too with -v), every configured secret masked."""
    from bot.redaction import scrub

    if verbose:
        print(scrub("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
    shown = str(exc) if isinstance(exc, ImsightError) else ""
    print(scrub(f"imsight: {prefix}{shown}".rstrip(": ")), file=sys.stderr)
    return status


def _offline_unless_allowed(allow_download: bool) -> None:
    # Set before transformers is imported: huggingface_hub reads it once, at import.
    if not allow_download:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _run(path: Path, *, verbose: bool) -> int:
    from bot.config import configured_secrets, load
    from bot.daemon import serve
    from bot.logs import setup_logging
    from bot.redaction import redact_in_logs

    config = load(path)
    redact_in_logs(configured_secrets(config))  # before anything can fail and print
    setup_logging("DEBUG" if verbose else config.logging.level, config.logging.format)
    _offline_unless_allowed(config.engine.allow_download)
    asyncio.run(serve(config))
    return 0


def _ask(path: Path | None, model_path: Path | None, images: list[Path], question: str) -> int:
    from bot.config import load, parse
    from bot.daemon import build_engine, image_limits
    from core.engine import GenerationLimits, PreparedImage
    from core.images import prepare, sha256

    config = load(path) if path is not None else parse({})
    # One question: a warm-up answer first would only double the wait.
    engine_update: dict[str, object] = {"warmup": False}
    if model_path is not None:
        engine_update["model_path"] = model_path
    config = config.model_copy(update={"engine": config.engine.model_copy(update=engine_update)})
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

    config = load(path)
    data_dir = config.storage.data_dir
    if not (data_dir / "imsight.db").exists():
        raise ImsightError(f"no history at {data_dir} ([storage] data_dir)")
    async with Store.open(data_dir / "imsight.db", lock_timeout_s=config.storage.lock_timeout_seconds) as store:
        if conversation is not None and not await store.has_chat(conversation, platform):
            where = f"{platform} " if platform else ""
            raise ImsightError(f"no stored {where}chat {conversation!r} in {data_dir} (nothing deleted)")
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


def _tiny_model(out: Path | None, config_path: Path | None) -> int:
    from core.tiny_model import build_tiny_model

    if config_path is not None:
        from bot.config import load

        model_path = load(config_path).engine.model_path
        if model_path is None or "tiny-model" not in model_path.name or (model_path / "config.json").exists():
            return 0  # a real model, or the tiny one is there already
        out = model_path
    if out is None:
        raise ConfigError("tiny-model: give a directory, or --config")
    # Its folder is usually the data dir (data/tiny-model): private from the start.
    out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    build_tiny_model(out)
    print(f"wrote a tiny random test model to {out} (plumbing tests only: its answers are noise)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
