"""Prometheus metrics (prometheus-client), served at ``/metrics``; ``/readyz`` beside it.

Counters and histograms are updated where things happen; queue depth, stored images and the
engine's own counters are read when Prometheus scrapes, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from adapters.base import ConnectionState

__all__ = ["Metrics"]

# Seconds: from milliseconds (an acknowledgement) to minutes (a long answer on a busy GPU).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

Probe = Callable[[], Awaitable[Mapping[str, float]]]


class Metrics:
    """One registry per daemon (several daemons may share a process, as in the tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("imsight_events", "Events received, by platform and outcome "
                              "(stored, duplicate)", ["platform", "outcome"], registry=r)
        self.jobs = Counter("imsight_jobs", "Questions ended, by outcome (done, failed, refused)", ["outcome"],
                            registry=r)
        self.ack_seconds = Histogram("imsight_ack_seconds", "Time to take an event in (what the platform "
                                     "waits for)", ["platform"], buckets=_BUCKETS, registry=r)
        self.first_token_seconds = Histogram("imsight_first_token_seconds", "From a job's start to the "
                                             "first words of its answer", buckets=_BUCKETS, registry=r)
        self.answer_seconds = Histogram("imsight_answer_seconds", "From a job's start to its whole answer",
                                        buckets=_BUCKETS, registry=r)
        self.answer_chunks = Counter("imsight_answer_chunks", "Pieces of answer text streamed to chats (the "
                                     "in-process engine sends one about every 50 ms: not a token count)", registry=r)
        self.tokens = _Tokens()
        r.register(self.tokens)
        self.queued = Gauge("imsight_queue_depth", "Questions waiting", registry=r)
        self.running = Gauge("imsight_jobs_running", "Questions being answered or delivered", registry=r)
        self.images = Gauge("imsight_images_stored", "Distinct images stored", registry=r)
        self.image_bytes = Gauge("imsight_image_bytes", "Bytes of stored image files", registry=r)
        self.engine = Gauge("imsight_engine", "The engine's own counters and gauges (cache hits, misses and "
                            "bytes, tokens generated, GPU memory)", ["name"], registry=r)
        self._probes: list[Probe] = []

    def connections(self, read: Callable[[], list[ConnectionState]]) -> None:
        """Export the push connections ``read`` returns (at each scrape)."""
        self.registry.register(_Connections(read))

    def keyed_requests(self, read: Callable[[], list[tuple[str, str, int]]]) -> None:
        """Export ``(platform, key name, requests)`` as ``read`` returns them (at each scrape)."""
        self.registry.register(_KeyedRequests(read))

    def probe(self, read: Probe) -> None:
        """Read ``read()`` into gauges at every scrape: {gauge attribute or "engine:<name>": value}."""
        self._probes.append(read)

    async def handle(self, request: web.Request) -> web.Response:
        for read in self._probes:
            for name, value in (await read()).items():
                if name.startswith("engine:"):
                    self.engine.labels(name.removeprefix("engine:")).set(value)
                    if name == "engine:tokens_generated":
                        self.tokens.value = value
                else:
                    gauge = getattr(self, name)
                    assert isinstance(gauge, Gauge)
                    gauge.set(value)
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _Connections(Collector):
    """Each push connection's state and reconnects, read from its adapter at each scrape."""

    def __init__(self, read: Callable[[], list[ConnectionState]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        states = self._read()
        up = GaugeMetricFamily("imsight_connection_open", "1 while a platform's push connection (Feishu "
                               "long connection, DingTalk Stream) is open", labels=["platform"])
        again = CounterMetricFamily("imsight_connection_reconnects", "Push connections opened again after "
                                    "a drop or at the platform's request", labels=["platform"])
        for state in states:
            up.add_metric([state.platform], float(state.open))
            again.add_metric([state.platform], float(state.reconnects))
        yield up
        yield again


class _KeyedRequests(Collector):
    """Requests by API key name, read from the adapters that count them at each scrape."""

    def __init__(self, read: Callable[[], list[tuple[str, str, int]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("imsight_api_key_requests", "Requests to the OpenAI-compatible endpoint, by "
                                     "platform and API key name", labels=["platform", "key"])
        for platform, key, count in self._read():
            family.add_metric([platform, key], float(count))
        yield family


class _Tokens(Collector):
    """A counter whose value the engine keeps (read at each scrape), so ``rate()`` works on it."""

    def __init__(self) -> None:
        self.value = 0.0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("imsight_tokens_generated", "Answer tokens generated by the in-process engine, "
                                  "all questions; rate() gives tokens per second", value=self.value)
