"""A facade's HTTP pages as an operator reads them: /metrics, parsed, and /healthz."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from support.facade import Facade


async def scrape(facade: Facade) -> str:
    """The /metrics page, which must be Prometheus's text format."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{facade.server.http_port}/metrics") as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of ``name`` on a scraped page, by its labels (sorted (name, value) pairs)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def retries(facade: Facade, action: str) -> dict[str, float]:
    """The upstream retries of ``action`` so far, by reason."""
    found = samples(await scrape(facade), "tiw_upstream_retries_total")
    # Series at zero are primed, not retries.
    return {
        dict(labels)["reason"]: value
        for labels, value in found.items()
        if dict(labels)["action"] == action and value
    }


async def healthz(facade: Facade) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{facade.server.http_port}/healthz") as r,
    ):
        body: dict[str, object] = await r.json()
        return body
