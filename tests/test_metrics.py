"""/metrics (Prometheus text format, read back with prometheus-client's own parser) and /readyz."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from helpers import b64, get, png, post


async def scrape(http: Any, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_count_what_happened(daemon, http):
    async with daemon(limits={"max_queued_per_chat": 1}) as d:
        before = await scrape(http, d.url)
        assert before[("imsight_queue_depth", ())] == 0
        _, body = await post(http, d.url, {"conversation_id": "m", "text": "What is it?", "wait": True,
                                           "images": [{"data": b64(png())}]})
        assert body["status"] == "done"
        await post(http, d.url, {"conversation_id": "m", "text": "again?"})  # stored
        await post(http, d.url, {"conversation_id": "m", "text": "and again?"})  # the chat is full: 429
        await post(http, d.url, {"conversation_id": "m", "message_id": "x", "text": ""})
        await post(http, d.url, {"conversation_id": "m", "message_id": "x", "text": ""})  # duplicate
        after = await scrape(http, d.url)
    events = {outcome: after.get(("imsight_events_total", (("outcome", outcome), ("platform", "api"))), 0)
              for outcome in ("stored", "duplicate", "refused")}
    assert events == {"stored": 3, "duplicate": 1, "refused": 1}
    assert after[("imsight_jobs_total", (("outcome", "done"),))] >= 1
    assert after[("imsight_jobs_total", (("outcome", "refused"),))] == 1
    assert after[("imsight_first_token_seconds_count", ())] >= 1
    assert after[("imsight_ack_seconds_count", (("platform", "api"),))] == 4  # the 429 is not an acknowledgement
    assert (after[("imsight_images_stored", ())], after[("imsight_image_bytes", ())]) == (1, len(png()))
    tokens = after[("imsight_engine", (("name", "tokens_generated"),))]
    assert tokens > 0  # the engine's own counters
    assert after[("imsight_tokens_generated_total", ())] == tokens  # a counter: rate() gives tokens/s
    assert ("imsight_engine", (("name", "prefix_cache_bytes"),)) in after


async def test_readyz_says_ready_once_everything_started(daemon, http):
    async with daemon() as d:
        status, body = await get(http, d.url, "/readyz")
        health, _ = await get(http, d.url, "/healthz")
    assert (status, body) == (200, {"status": "ready", "checks": {"started": True, "store": True}})
    assert health == 200


OPERATING = Path(__file__).resolve().parents[1] / "docs" / "operating.md"


async def test_the_docs_describe_every_metric_there_is(daemon, http):
    readme = OPERATING.read_text()
    documented = set(re.findall(r"`(imsight_[a-z_]+)", readme))
    async with daemon() as d, http.get(f"{d.url}/metrics") as resp:
        families = {f.name for f in text_string_to_metric_families(await resp.text())
                    if f.name.startswith("imsight") and not f.name.endswith("_created")}  # the client's timestamps
    counters = {f"{name}_total" for name in families}  # the client names counter families without _total
    assert documented - families - counters == set()  # nothing documented that does not exist
    assert {name for name in families if name not in documented and f"{name}_total" not in documented} == set()
