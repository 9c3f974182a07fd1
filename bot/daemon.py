"""Lifecycle: start everything in dependency order, stop in reverse, on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType

from aiohttp import web

from adapters.base import Adapter, Connected, Keyed, Pulling, Pushed
from adapters.startup import explain
from adapters.webhook import WebhookSettings
from bot.admin import AdminPages
from bot.admission import Admission
from bot.config import Config, allowed_hosts, configured_secrets, deployment, image_budget
from bot.dispatch import Dispatcher
from bot.files import ImageFiles
from bot.metrics import Metrics
from bot.outbox import Outbox
from bot.redaction import redact_in_logs
from bot.retention import Retention
from bot.store import Store
from bot.watch import JobWatch
from bot.web import WebServer
from bot.workers import Workers
from core.engine import Engine, GenerationLimits, Measured
from core.errors import AdapterError, ConfigError, ImsightError, StartupError
from core.images import ImageLimits
from core.model_files import resolve
from core.transformers_engine import TransformersEngine

__all__ = ["Daemon", "build_engine", "serve"]

log = logging.getLogger(__name__)

MB = 2**20


def build_engine(config: Config) -> Engine:
    """The engine the config names; raises ``ModelUnavailable`` when its files are not here."""
    cfg = config.engine
    if cfg.kind == "openai":
        from core.openai_engine import OpenAIEngine

        return OpenAIEngine(
            cfg.base_url, model=cfg.model, api_key=cfg.api_key.get_secret_value() if cfg.api_key else None,
            timeout_s=cfg.timeout_seconds, attempts=cfg.connect_attempts, max_batch=cfg.max_batch,
        )
    source = resolve(cfg.model, cfg.model_path, allow_download=cfg.allow_download, cache_dir=cfg.cache_dir)
    return TransformersEngine(
        source, device=cfg.device, dtype=cfg.dtype, quantization=cfg.quantization, cache_dir=cfg.cache_dir,
        max_batch=cfg.max_batch, batch_window_s=cfg.batch_window_ms / 1000,
        prefix_cache_bytes=int(cfg.prefix_cache_mb * MB), warmup=cfg.warmup,
        context_tokens=cfg.context_tokens, cuda_graphs=cfg.cuda_graphs, compile_decode=cfg.compile_decode,
        decoder_kernels=cfg.decoder_kernels, vision_kernels=cfg.vision_kernels,
        split_kv_attention=cfg.split_kv_attention, compile_cache=config.storage.data_dir / "compile-cache",
        unpacked_weights=cfg.unpacked_weights,
        int4_cache=config.storage.data_dir / "int4-cache" if cfg.int4_cache else None,
    )


def image_limits(config: Config) -> ImageLimits:
    return ImageLimits(
        max_bytes=int(config.images.max_mb * MB),
        max_pixels=config.images.max_pixels,
        max_side=config.images.max_side,
    )


def build_adapters(config: Config) -> list[Adapter]:
    """Every enabled platform's adapter (``adapters.registry``), in the registry's order."""
    where = deployment(config)
    adapters = []
    for name, settings in config.adapters.enabled():
        try:
            adapters.append(settings.build(where))
        except AdapterError as exc:  # a setting the platform's own library refuses
            raise ConfigError(f"adapters.{name}: {exc}") from None
    return adapters


class Daemon:
    """The whole bot; ``async with Daemon(config):`` runs it until the block ends."""

    def __init__(
        self, config: Config, *, engine: Engine | None = None, adapters: Sequence[Adapter] = ()
    ) -> None:
        """``engine`` replaces the configured one; ``adapters`` come in addition to the configured ones."""
        self.config = config
        self._engine = engine
        self._extra_adapters = list(adapters)
        self._stack = AsyncExitStack()
        self.web: WebServer | None = None
        self.store: Store | None = None  # while running
        self.dispatcher: Dispatcher | None = None  # while running
        self._ready = False
        self._adapters: list[Adapter] = []
        self.engine: Engine | None = None  # once started

    def banner(self) -> str:
        """What a person starting the daemon wants to see first: where it is, what is on, a first try."""
        cfg = self.config
        lines = [f"imsight is running on {self.url}"]
        lines.append("  platforms  " + ", ".join(a.name for a in self._adapters) if self._adapters
                     else "  platforms  none enabled")
        if self.engine is not None:
            where = getattr(self.engine, "device", cfg.engine.base_url if cfg.engine.kind == "openai" else "")
            lines.append(f"  model      {self.engine.model} ({self.engine.name}{', ' + where if where else ''})")
        if cfg.admin.enabled:
            lines.append(f"  history    {self.url}/admin")
        hook = cfg.adapters.platform("webhook")
        if isinstance(hook, WebhookSettings) and hook.enabled:
            auth = "" if hook.token is None else ' -H "Authorization: Bearer $TOKEN"'
            lines.append(f"  try        curl{auth} -F conversation_id=try -F 'text=What is on this screen?' "
                         f"-F wait=true -F image=@docs/sample-screenshot.png {self.url}/api/v1/messages")
        return "\n".join(lines)

    @property
    def url(self) -> str:
        assert self.web is not None, "not started"
        return f"http://{self.config.server.host}:{self.web.port}"

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            try:
                await self._stack.aclose()
            except Exception:  # the reason the start failed is what the operator must see
                log.exception("error while stopping after a failed start")
            raise

    async def _start(self) -> None:
        cfg, stack = self.config, self._stack
        redact_in_logs(configured_secrets(cfg))
        # Everything that can fail on configuration fails before the model is loaded or a port bound.
        engine = self._engine or build_engine(cfg)
        self.engine = engine
        adapters = [*build_adapters(cfg), *self._extra_adapters]
        self._adapters = adapters
        limits = image_limits(cfg)

        data_dir = cfg.storage.data_dir
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if data_dir.stat().st_mode & 0o077:
            log.warning("%s was open to other users; making it private (0700)", data_dir)
            data_dir.chmod(0o700)
        store = await stack.enter_async_context(
            Store.open(data_dir / "imsight.db", lock_timeout_s=cfg.storage.lock_timeout_seconds))
        self.store = store
        files = ImageFiles(data_dir / "images")
        budget = await asyncio.to_thread(image_budget, cfg)  # "auto" walks images/: off the loop
        if cfg.storage.max_bytes == "auto":
            log.info("image files may take %.1f GB ([storage] max_bytes = \"auto\": half the free disk)", budget / 1e9)
        retention = Retention(store, files, days=cfg.storage.retention_days, max_bytes=budget)
        await retention.start()
        stack.push_async_callback(retention.stop)

        watch = JobWatch()
        metrics = Metrics()
        by_name = {a.name: a for a in adapters}
        outbox = Outbox(store, by_name, watch, attempts=cfg.limits.delivery_attempts, metrics=metrics)
        workers = Workers(
            store, files, engine, by_name, outbox, watch,
            count=cfg.engine.workers, image_limits=limits,
            generation=GenerationLimits(max_new_tokens=cfg.engine.max_new_tokens),
            ask_for_image=cfg.context.no_image == "ask",
            job_timeout_s=cfg.limits.job_timeout_seconds, engine_retry_s=cfg.limits.engine_retry_minutes * 60,
            metrics=metrics,
        )
        dispatcher = Dispatcher(
            store, files, workers, outbox, watch, by_name, image_limits=limits,
            window_s=cfg.context.window_minutes * 60, history_turns=cfg.context.history_turns,
            admission=Admission(cfg.limits.max_queued, cfg.limits.max_queued_per_chat,
                                cfg.limits.questions_per_sender_per_minute),
            metrics=metrics, log_text=cfg.logging.message_text,
            acknowledge_images=cfg.context.image_alone == "acknowledge",
        )
        self.dispatcher = dispatcher
        metrics.probe(lambda: _stored(store))
        metrics.connections(lambda: [state for adapter in adapters if isinstance(adapter, Pushed)
                                     if (state := adapter.connection) is not None])
        metrics.keyed_requests(lambda: [(adapter.name, key, count) for adapter in adapters if isinstance(adapter, Keyed)
                                        for key, count in adapter.requests_by_key().items()])
        if isinstance(engine, Measured):
            measured = engine

            async def engine_values() -> dict[str, float]:
                return {f"engine:{name}": value for name, value in measured.measurements().items()}

            metrics.probe(engine_values)
        server = cfg.server
        web = WebServer(server.host, server.port, shutdown_timeout_s=5, allowed_hosts=allowed_hosts(cfg),
                        max_connections=server.max_connections, header_timeout_s=server.header_timeout_seconds,
                        body_timeout_s=server.body_timeout_seconds, trusted_proxies=server.trusted_proxies)
        web.app.router.add_get("/metrics", metrics.handle)
        web.app.router.add_get("/readyz", self._readyz)
        if cfg.admin.enabled:
            assert cfg.admin.token is not None  # checked with the rest of the config
            AdminPages(store, files, cfg.admin.token.get_secret_value(), dispatcher.forget,
                       session_s=cfg.admin.session_hours * 3600).mount(web.app)
        for adapter in adapters:
            adapter.mount(web.app)
            # Stopped after the workers (they deliver through it), and after a start that failed
            # half-way (its HTTP session is open).
            stack.push_async_callback(adapter.stop)
            try:
                await adapter.start(dispatcher)
            except Exception as exc:  # one line with the fix; the library's text may hold a token
                raise StartupError(explain(adapter.name, exc, getattr(adapter, "endpoint", ""))) from exc
        # The model loads after the platforms said yes: a wrong token fails in seconds, not after a
        # minute of loading. Messages that arrive meanwhile wait in the queue.
        await engine.start()
        stack.push_async_callback(engine.stop)
        if engine.max_batch > cfg.engine.workers:
            log.warning("[engine] workers = %d < max_batch = %d: batches never hold more than %d questions",
                        cfg.engine.workers, engine.max_batch, cfg.engine.workers)
        await dispatcher.start()
        stack.push_async_callback(dispatcher.stop)  # intakes download through the adapters

        await outbox.start()
        stack.push_async_callback(outbox.stop, cfg.server.shutdown_grace_seconds)  # after the workers
        await workers.start()
        stack.push_async_callback(workers.stop, cfg.server.shutdown_grace_seconds)
        stack.push_async_callback(_stop_intake, adapters, dispatcher)  # before the drain, after HTTP intake
        await web.start()
        self.web = web
        stack.push_async_callback(web.stop)  # stop taking requests before anything else stops
        stack.callback(watch.close)  # first of all: requests waiting for answers return now (202)
        self._ready = True  # the engine is loaded, every adapter started, the server listening

    async def stop(self) -> None:
        self._ready = False
        await self._stack.aclose()

    async def _readyz(self, request: web.Request) -> web.Response:
        """200 once everything has started and the store answers; 503 with what is not ready."""
        checks = {"started": self._ready, "store": False}
        for adapter in self._adapters:
            if isinstance(adapter, Connected):
                checks[adapter.name] = adapter.connected
        if self.store is not None:
            try:
                await self.store.queue_counts()
                checks["store"] = True
            except ImsightError:
                pass
        ready = all(checks.values())
        return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
                                 status=200 if ready else 503)

    async def __aenter__(self) -> Daemon:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


async def _stop_intake(adapters: Sequence[Adapter], dispatcher: Dispatcher) -> None:
    """The first step of stopping: nothing new comes in (the HTTP server stopped just before; pulling
    adapters stop fetching), so what is drained next is all there is."""
    for adapter in adapters:
        if isinstance(adapter, Pulling):
            try:
                await adapter.stop_intake()
            except Exception:  # one adapter's failure must not keep the others' answers from draining
                log.exception("%s: stopping its intake failed", adapter.name)
    dispatcher.close_intake()


async def _stored(store: Store) -> dict[str, float]:
    queued, running = await store.queue_counts()
    images, image_bytes = await store.retention.image_stats()
    return {"queued": queued, "running": running, "images": images, "image_bytes": image_bytes}


async def serve(config: Config) -> None:
    """Run until SIGINT or SIGTERM; then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Daemon(config) as daemon:
        print(daemon.banner(), flush=True)
        await stop.wait()
        log.info("stopping: no new requests; the running answer gets %.0fs to finish",
                 config.server.shutdown_grace_seconds)
    log.info("stopped")
