"""The alert rules and the dashboard on a real Prometheus scraping a live facade.

promtool's unit tests (k8s/monitoring/alerts.test.yaml) prove the rules on series written by hand;
these prove them on the series the facade really exports, with the target labels the Prometheus
Operator gives its pods. Each test runs its own Prometheus: alert state must not carry over.
Prometheus applies new scrape targets in 5-second steps, so the first sample arrives ~5 s after start.

Not triggered here: TiwFacadeLimiterNearSaturation. Its rate() over [5m] divides by 300 s, and a
facade admits at most TIW_RATE_LIMIT (>= 1) requests/s per action, so it needs 0.8 x 300 = 240 s of
saturation before the expression holds; the other limiter alerts are ratios or quantiles and hold
within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.facade import Facade, StartFacade
from support.prometheus import NAMESPACE, Prometheus, Target
from support.redis_server import free_port
from tiw_facade._proto.tiw.v20190919 import tiw_pb2 as pb

pytestmark = pytest.mark.slow

DASHBOARD = Path(__file__).resolve().parents[1] / "k8s" / "monitoring" / "grafana-dashboard.json"
# Values for the dashboard's variables, as Grafana would substitute them.
DASHBOARD_VARIABLES = {"namespace": NAMESPACE, "__rate_interval": "1m"}

PUSH = pb.DescribeWhiteboardPushRequest(sdk_app_id=1400000001, task_id="ghucnligqtgtvk2624mb")
VIDEO = pb.DescribeVideoGenerationTaskRequest(sdk_app_id=1400000001, task_id="00e1jv8ve0jcqk7da9lb")
SNAPSHOT = pb.DescribeSnapshotTaskRequest(
    sdk_app_id=1400127230, task_id="f2e1728c-6e87-4481-abe1-cde8542a5a10"
)
MISSING = pb.DescribeSnapshotTaskRequest(sdk_app_id=1400127230, task_id="no-such-task")


def own_push(facade: Facade) -> pb.DescribeWhiteboardPushRequest:
    """A push task of its own, for a call that is to take a slot of the quota: identical calls at
    once would share one request to TIW, and later ones be answered from the cache (docs/answers.md)."""
    return pb.DescribeWhiteboardPushRequest(
        sdk_app_id=PUSH.sdk_app_id, task_id=facade.emulator.add_push_task()
    )


StartPrometheus = Callable[..., Awaitable[Prometheus]]


@pytest.fixture
async def watch() -> AsyncIterator[StartPrometheus]:
    """Start a Prometheus scraping the given facades (pods tiw-facade-0, -1, ...); stopped at the end."""
    started: list[Prometheus] = []

    async def start(*facades: Facade) -> Prometheus:
        targets = [
            Target(f"127.0.0.1:{facade.server.http_port}", pod=f"tiw-facade-{index}")
            for index, facade in enumerate(facades)
        ]
        prometheus = Prometheus(targets)
        started.append(prometheus)
        await asyncio.to_thread(prometheus.start)  # the facades must keep answering meanwhile
        return prometheus

    yield start
    for prometheus in started:
        await asyncio.to_thread(prometheus.stop)


@contextlib.asynccontextmanager
async def traffic(*calls: Callable[[], Awaitable[Any]], every: float = 0.2) -> AsyncIterator[None]:
    """All ``calls``, started again every ``every`` seconds whether the last ones ended or not (a
    steady offered load), until the block ends; their failures are the point."""
    running: set[asyncio.Future[Any]] = set()

    async def run() -> None:
        while True:
            for call in calls:
                future = asyncio.ensure_future(call())
                running.add(future)
                future.add_done_callback(running.discard)
                # Fetch each failure, or asyncio logs "exception was never retrieved" for it.
                future.add_done_callback(lambda done: done.cancelled() or done.exception())
            await asyncio.sleep(every)

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        task.cancel()
        for future in [task, *running]:
            future.cancel()
        await asyncio.gather(task, *running, return_exceptions=True)


async def eventually(
    prometheus: Prometheus, condition: Callable[[Prometheus], bool], within: float = 40
) -> None:
    """Poll Prometheus (from a thread: the facades live on this event loop) until ``condition``."""
    end = time.monotonic() + within
    while not await asyncio.to_thread(condition, prometheus):
        if time.monotonic() > end:
            alerts = [(a["labels"], a["state"]) for a in await asyncio.to_thread(prometheus.alerts)]
            raise AssertionError(f"not met in {within} s; alerts: {alerts}\n{prometheus.log[-2000:]}")
        await asyncio.sleep(0.25)


def has_data(expr: str) -> Callable[[Prometheus], bool]:
    return lambda prometheus: bool(prometheus.query(expr))


def alert(name: str, states: set[str], **labels: str) -> Callable[[Prometheus], bool]:
    """Is ``name`` in one of ``states`` for a series with (at least) ``labels``?"""

    def check(prometheus: Prometheus) -> bool:
        return any(
            item["labels"]["alertname"] == name
            and item["state"] in states
            and all(item["labels"].get(key) == value for key, value in labels.items())
            for item in prometheus.alerts()
        )

    return check


async def test_healthy_traffic_raises_no_alert(start_facade: StartFacade, watch: StartPrometheus) -> None:
    facade = await start_facade()
    prometheus = await watch(facade)
    healthy = (
        lambda: facade.stub.DescribeWhiteboardPush(PUSH, timeout=5),
        lambda: facade.stub.DescribeVideoGenerationTask(VIDEO, timeout=5),
        lambda: facade.stub.DescribeSnapshotTask(SNAPSHOT, timeout=5),
    )
    async with traffic(*healthy):
        # Scraped, and the OK counter seen rising (two samples apart): the rules see real traffic.
        await eventually(
            prometheus, has_data('up{job="tiw-facade", namespace="tiw-facade", pod="tiw-facade-0"} == 1')
        )
        ok = 'increase(tiw_upstream_requests_total{job="tiw-facade", code="OK"}[1m]) > 0'
        await eventually(prometheus, has_data(ok))
        await asyncio.sleep(3)  # three more evaluations of every rule on that data
        alerts = await asyncio.to_thread(prometheus.alerts)
        rules = await asyncio.to_thread(prometheus.rules)
    assert [(a["labels"]["alertname"], a["state"]) for a in alerts] == []
    assert {rule["name"] for rule in rules} == set(prometheus.alert_names)
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []


async def test_refused_credentials_raise_auth_failure(
    start_facade: StartFacade, watch: StartPrometheus
) -> None:
    # The emulator knows only the demo key: it answers every signature AuthFailure.SignatureFailure.
    facade = await start_facade(TENCENTCLOUD_SECRET_KEY="not-the-emulators-key")
    prometheus = await watch(facade)
    async with traffic(lambda: facade.stub.DescribeWhiteboardPush(PUSH, timeout=5)):
        # No `for:`: firing at the first evaluation that sees the code.
        await eventually(
            prometheus,
            alert(
                "TiwFacadeUpstreamAuthFailure",
                {"firing"},
                code="AuthFailure.SignatureFailure",
                namespace=NAMESPACE,
            ),
        )
        # AuthFailure is INTERNAL to callers, so the internal-errors ratio (for: 5m) is pending too.
        await eventually(
            prometheus,
            alert(
                "TiwFacadeInternalErrors",
                {"pending"},
                grpc_method="DescribeWhiteboardPush",
                namespace=NAMESPACE,
            ),
        )
    assert facade.emulator.stats()["DescribeWhiteboardPush"].rejected > 0  # refused by the emulator, for real


async def test_saturated_action_raises_limiter_alerts(
    start_facade: StartFacade, watch: StartPrometheus
) -> None:
    # One request per second: a few callers wait up to 3 s for a slot, the rest are refused at once.
    facade = await start_facade(TIW_RATE_LIMIT="1", TIW_MAX_QUEUE_WAIT="3")
    prometheus = await watch(facade)

    def push() -> Awaitable[pb.DescribeWhiteboardPushResponse]:
        call: Awaitable[pb.DescribeWhiteboardPushResponse] = facade.stub.DescribeWhiteboardPush(
            own_push(facade), timeout=10
        )
        return call

    async with traffic(*[push] * 5, every=0.5):
        await eventually(
            prometheus,
            alert(
                "TiwFacadeLimiterRejecting",
                {"pending", "firing"},
                action="DescribeWhiteboardPush",
                reason="max_wait",
                namespace=NAMESPACE,
            ),
        )
        await eventually(
            prometheus,
            alert("TiwFacadeLimiterWaitHigh", {"pending", "firing"}, action="DescribeWhiteboardPush"),
        )
    # Only the saturated action: every other action's series exists (primed) and stays quiet.
    actions = {
        item["labels"].get("action")
        for item in await asyncio.to_thread(prometheus.alerts)
        if item["labels"]["alertname"].startswith("TiwFacadeLimiter")
    }
    assert actions == {"DescribeWhiteboardPush"}


async def test_replicas_without_redis_raise_not_shared(
    start_facade: StartFacade, watch: StartPrometheus
) -> None:
    # Two pods, each with its in-process limiter: together they allow twice TIW's limit.
    prometheus = await watch(await start_facade(), await start_facade())
    await eventually(
        prometheus, alert("TiwFacadeLimiterNotShared", {"pending", "firing"}, namespace=NAMESPACE)
    )


async def test_no_replica_up_raises_no_ready_replicas() -> None:
    nobody = Target(f"127.0.0.1:{free_port()}")  # a pod whose /metrics nobody answers
    prometheus = Prometheus([nobody])
    try:
        await asyncio.to_thread(prometheus.start)
        # With the namespace label: the target was scraped and is down (before the first scrape,
        # absent(up) makes it pending without one).
        await eventually(prometheus, alert("TiwFacadeNoReadyReplicas", {"pending"}, namespace=NAMESPACE))
    finally:
        await asyncio.to_thread(prometheus.stop)


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows included, variables substituted."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            yield from walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                yield panel.get("title", "?"), substitute(target["expr"])

    yield from walk(json.loads(DASHBOARD.read_text())["panels"])


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in DASHBOARD_VARIABLES:
            raise AssertionError(f"unknown dashboard variable ${name} in {expr}")
        return DASHBOARD_VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


async def test_every_dashboard_query_runs_and_finds_series(
    start_facade: StartFacade, watch: StartPrometheus
) -> None:
    # Traffic that gives every panel something: answers, a TIW error, waits and refusals.
    facade = await start_facade(TIW_RATE_LIMIT="2", TIW_MAX_QUEUE_WAIT="0.5")
    prometheus = await watch(facade)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: facade.stub.DescribeVideoGenerationTask(VIDEO, timeout=5),
        lambda: facade.stub.DescribeSnapshotTask(MISSING, timeout=5),
        *[lambda: facade.stub.DescribeWhiteboardPush(own_push(facade), timeout=5)] * 4,
    ]
    async with traffic(*calls, every=0.5):
        for expr in (
            'rate(grpc_server_handled_total{job="tiw-facade", grpc_code="NotFound"}[1m]) > 0',
            'rate(tiw_limiter_rejected_total{job="tiw-facade"}[1m]) > 0',
            'rate(tiw_upstream_requests_total{job="tiw-facade", code="OK"}[1m]) > 0',
        ):
            await eventually(prometheus, has_data(expr))
    queries = list(dashboard_queries())
    assert len(queries) > 10
    empty = []
    for title, expr in queries:
        result = await asyncio.to_thread(prometheus.query, expr)  # an error or a warning raises
        if not result:
            empty.append((title, expr))
    assert empty == []  # a misspelt metric or label is a success with no series
    # The dashboard's $namespace variable: label_values(tiw_facade_build_info{job="tiw-facade"}, namespace).
    values = await asyncio.to_thread(
        prometheus.api, "label/namespace/values", **{"match[]": 'tiw_facade_build_info{job="tiw-facade"}'}
    )
    assert values == [NAMESPACE]


def test_prometheus_reports_query_errors() -> None:
    """The helper cannot pass a broken query off as an empty one."""
    from support.prometheus import PrometheusError

    with (
        Prometheus([], prometheus_rule=None) as prometheus,
        pytest.raises(PrometheusError, match="parse error"),
    ):
        prometheus.query("rate(up[5m)")
