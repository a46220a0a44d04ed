"""Where the facade's CPU goes: the facade under cProfile (main-thread CPU time).

Run by `--profile`, and by a full run when an overhead or local-path goal is missed. Two facades
(uvloop, the `serve` assembly), each profiled in its own process:

- the upstream path: sequential calls of the four repeatable RPCs against the emulator, then 32 in
  flight (profile in `bench/facade.prof`);
- the local path: invalid requests, then calls refused at once with RESOURCE_EXHAUSTED, 32 in
  flight, against a facade whose one token is held (profile in `bench/facade-local.prof`).

`python -m pstats` or snakeviz read the profiles. cProfile inflates code made of many small Python
calls (validation, translation) more than C code, so the shares are a map, not a measurement; the
CPU per call figures above come from unprofiled runs.
"""

from __future__ import annotations

import pstats
from collections import defaultdict
from pathlib import Path

from bench.calls import PARAMS, REPEATABLE
from bench.common import Budget, Section, grpc_call, table
from bench.local import INVALID_CALL, VALID_CALL, conc_command, exhausted_facade
from bench.procs import HOST, Processes, blackhole, facade_environment, free_port

PROFILE = Path(__file__).resolve().parent / "facade.prof"
LOCAL_PROFILE = Path(__file__).resolve().parent / "facade-local.prof"
UNLIMITED = 100_000

# (area, substring of the code's file name); the first match wins.
AREAS: tuple[tuple[str, str], ...] = (
    ("tiw_facade: handler.py", "tiw_facade/handler.py"),
    ("tiw_facade: upstream.py", "tiw_facade/upstream.py"),
    ("tiw_facade: signing.py", "tiw_facade/signing.py"),
    ("tiw_facade: translate.py", "tiw_facade/translate.py"),
    ("tiw_facade: validate.py", "tiw_facade/validate.py"),
    ("tiw_facade: errors.py", "tiw_facade/errors.py"),
    ("tiw_facade: interceptor.py", "tiw_facade/interceptor.py"),
    ("tiw_facade: metrics.py", "tiw_facade/metrics.py"),
    ("tiw_facade: logs.py (JSON log line)", "tiw_facade/logs.py"),
    ("tiw_facade: limiter/", "tiw_facade/limiter/"),
    ("stdlib logging", "/logging/"),
    ("prometheus_client", "prometheus_client"),
    ("aiohttp / yarl / multidict", "aiohttp"),
    ("aiohttp / yarl / multidict", "yarl"),
    ("aiohttp / yarl / multidict", "multidict"),
    ("grpc (Python parts)", "/grpc/"),
    ("grpc_status / protobuf", "grpc_status"),
    ("grpc_status / protobuf", "google/protobuf"),
    ("json", "/json/"),
    (
        "asyncio (mostly grpc.aio's own per-RPC tasks and asyncio.wait, which the bare echo pays too)",
        "/asyncio/",
    ),
    ("uuid / random / hashlib / hmac", "/uuid.py"),
    ("uuid / random / hashlib / hmac", "/random.py"),
    ("uuid / random / hashlib / hmac", "/hmac.py"),
)
Functions = tuple[tuple[str, str], ...]  # (file suffix, function name) pairs


def _f(*pairs: str) -> Functions:
    """``_f("tiw_facade/upstream.py:call", ...)``: functions by file suffix and name."""
    return tuple((pair.rsplit(":", 1)[0], pair.rsplit(":", 1)[1]) for pair in pairs)


HANDLER = _f("tiw_facade/handler.py:handle")
INTERCEPTOR = _f("tiw_facade/interceptor.py:unary")  # RpcObserver's wrapper around every unary RPC
# Stages of the request path: (label, functions whose CPU counts, functions whose CPU is taken out).
STAGES: tuple[tuple[str, Functions, Functions], ...] = (
    ("interceptor `interceptor.RpcObserver` (its `unary` wrapper less the handler: metrics, log line)",
     INTERCEPTOR, HANDLER),
    ("&nbsp;&nbsp;of which the JSON access-log line (`logs.LineTemplate.emit` → `logs.JsonFormatter.format`)",
     _f("tiw_facade/logs.py:emit"), ()),
    ("handler `handler._behavior.handle`", HANDLER, ()),
    ("&nbsp;&nbsp;validation `validate.violations`", _f("tiw_facade/validate.py:violations"), ()),
    ("&nbsp;&nbsp;translation `translate.to_tiw` + `translate.from_tiw`",
     _f("tiw_facade/translate.py:to_tiw", "tiw_facade/translate.py:from_tiw"), ()),
    ("&nbsp;&nbsp;rich statuses `errors.status_for` + `errors.invalid_argument`",
     _f("tiw_facade/errors.py:status_for", "tiw_facade/errors.py:invalid_argument"), ()),
    ("&nbsp;&nbsp;upstream `upstream.TiwClient.call`", _f("tiw_facade/upstream.py:call"), ()),
    ("&nbsp;&nbsp;&nbsp;&nbsp;aiohttp `ClientSession._request`", _f("aiohttp/client.py:_request"), ()),
    ("&nbsp;&nbsp;&nbsp;&nbsp;signing `signing.Signer.headers`", _f("tiw_facade/signing.py:headers"), ()),
    ("&nbsp;&nbsp;&nbsp;&nbsp;limiter `acquire` + `Lease.release`",
     _f("tiw_facade/limiter/_queue.py:acquire", "tiw_facade/limiter/_ledger.py:release"), ()),
    ("&nbsp;&nbsp;&nbsp;&nbsp;JSON in and out `tencent_api.encode` + `TencentApi._response`",
     _f("tiw_facade/tencent_api.py:encode", "tiw_facade/tencent_api.py:_response"), ()),
)  # fmt: skip
OUTSIDE = (
    "outside the interceptor: gRPC core and grpc.aio, uvloop, aiohttp's protocol callbacks (response parsing)"
)
EVENT_LOOP = "event loop itself: uvloop, gRPC core, syscalls (C, seen as the loop's own time)"


def run(procs: Processes, budget: Budget) -> Section:
    with procs.scope():
        upstream_calls = _drive_upstream(procs, budget)
    with procs.scope(), blackhole() as hole:
        local_calls = _drive_local(procs, budget, hole)
    intro = __doc__.split("\n", 1)[1].strip()
    return Section(
        "Where the facade's time goes (cProfile)",
        "\n\n".join([
            intro,
            _summary("The upstream path", PROFILE, upstream_calls),
            _summary("The local path (INVALID_ARGUMENT, RESOURCE_EXHAUSTED)", LOCAL_PROFILE, local_calls),
        ]),
    )  # fmt: skip


def _drive_upstream(procs: Processes, budget: Budget) -> int:
    _, url = procs.emulator(rate_limit=UNLIMITED)
    grpc_port = free_port()
    env = facade_environment(url, grpc_port, free_port(), TIW_RATE_LIMIT=str(UNLIMITED))
    facade = procs.facade(env, profile=PROFILE)
    target = f"{HOST}:{grpc_port}"
    worker = procs.worker("load-profile", "grpc")
    calls = 0
    for action in REPEATABLE:
        result = worker.request(
            {"op": "seq", "target": target, "call": grpc_call(action, {}), "params": [PARAMS[action]],
             "warmup": 10, "n": budget.seq_calls // 2, "timeout": 5},
            timeout=120,
        )  # fmt: skip
        calls += sum(result["codes"].values()) + 10
    specs = [grpc_call(a, PARAMS[a]) for a in REPEATABLE]
    command = {**conc_command(target, specs[0], budget, budget.conc_seconds), "calls": specs, "timeout": 5}
    calls += int(worker.request(command, timeout=120)["calls_total"])
    procs.stop(worker)
    procs.stop(facade, grace=30)  # SIGTERM: the facade drains, returns, and the profile is written
    return calls


def _drive_local(procs: Processes, budget: Budget, hole: int) -> int:
    worker = procs.worker("load-profile-local", "grpc")
    facade, target = exhausted_facade(procs, hole, worker, profile=LOCAL_PROFILE)
    calls = 0
    for call in (INVALID_CALL, VALID_CALL):
        calls += worker.request(conc_command(target, call, budget, budget.local_seconds), timeout=120)[
            "calls_total"
        ]
    worker.request({"op": "release"}, timeout=30)
    procs.stop(worker)
    procs.stop(facade, grace=30)
    return calls


def _area(filename: str) -> str | None:
    for area, needle in AREAS:
        if needle in filename:
            return area
    return None


Key = tuple[str, int, str]  # (file, line, function)
# pstats' table: key -> (primitive calls, calls, self time, cumulative time, {caller: (.., .., self, cum)})
Stats = dict[Key, tuple[int, int, float, float, dict[Key, tuple[int, int, float, float]]]]


def _cumulative(raw: Stats, functions: Functions) -> float | None:
    """CPU under these functions, callees included (the largest entry of each); None if none ran.

    A stage whose functions did not run (or were renamed) shows as absent rather than as zero.
    """
    found = [
        max(e[3] for (filename, _, name), e in matches)
        for suffix, func in functions
        if (matches := [(k, e) for k, e in raw.items() if k[0].endswith(suffix) and k[2] == func])
    ]
    return sum(found) if found else None


def _stage_share(raw: Stats, total: float, plus: Functions, minus: Functions) -> str:
    counted = _cumulative(raw, plus)
    if counted is None:
        return "— (not called)"
    return f"{(counted - (_cumulative(raw, minus) or 0.0)) / total:.1%}"


def _by_area(raw: Stats) -> dict[str, float]:
    """Self time by area. Code in no area (builtins, stdlib helpers) counts for its callers' areas,
    in proportion to the time each caller spent in it."""
    by_area: dict[str, float] = defaultdict(float)

    def assign(key: Key, seconds: float, depth: int) -> None:
        filename, _, name = key
        if filename.endswith("asyncio/runners.py") and name == "run":
            by_area[EVENT_LOOP] += seconds
            return
        area = _area(filename)
        callers = raw[key][4] if key in raw else {}
        spent = sum(entry[2] for entry in callers.values())
        if area is not None or depth >= 5 or not spent:
            by_area[area or "other Python"] += seconds
            return
        for caller, entry in callers.items():
            assign(caller, seconds * entry[2] / spent, depth + 1)

    for key, entry in raw.items():
        assign(key, entry[2], 0)
    return by_area


def _where(key: Key) -> str:
    filename, line, name = key
    short = filename.split("site-packages/")[-1].split("/service/")[-1].split("/lib/python3.11/")[-1]
    return f"`{short}:{line}({name})`"


def _summary(title: str, profile: Path, calls: int) -> str:
    raw: Stats = pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values())
    by_area = _by_area(raw)
    area_rows = [
        [area, f"{seconds / total:.1%}"] for area, seconds in sorted(by_area.items(), key=lambda kv: -kv[1])
    ]
    stage_rows = [[label, _stage_share(raw, total, plus, minus)] for label, plus, minus in STAGES]
    inside = _cumulative(raw, INTERCEPTOR)
    stage_rows.append([OUTSIDE, "—" if inside is None else f"{(total - inside) / total:.1%}"])
    top_self = sorted(raw.items(), key=lambda kv: -kv[1][2])[:12]
    top_rows = [[_where(key), f"{entry[2]:.3f}", f"{entry[3]:.3f}"] for key, entry in top_self]
    return f"""\
### {title}

{calls} calls profiled, {total:.2f} s of the facade's main-thread CPU under the profiler.

Stage by stage (CPU under each function, callees included; indented rows are part of the row above):

{table(["stage", "share of the facade's CPU"], stage_rows)}

By area (self time by the file the code is in; builtins and stdlib helpers count for their callers):

{table(["area", "share"], area_rows)}

Functions with the most self time (Cython and C code called from a function counts as its self time):

{table(["function", "self s", "cumulative s"], top_rows)}"""
