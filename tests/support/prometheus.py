"""A real Prometheus server for tests: scrapes given /metrics targets every second and evaluates the
PrometheusRule of k8s/monitoring every second, on its own free port with throw-away storage.

    with Prometheus([Target("127.0.0.1:8080", pod="tiw-facade-0")]) as prometheus:
        prometheus.query('up{job="tiw-facade"}')
        prometheus.alerts()

The `prometheus` binary comes with the Debian package that also ships promtool (scripts/install-tools).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from support.redis_server import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_RULE = ROOT / "k8s" / "monitoring" / "prometheusrule.yaml"
JOB = "tiw-facade"  # what servicemonitor.yaml gives the targets, and every rule selects
NAMESPACE = "tiw-facade"  # what the Prometheus Operator adds as a target label in the cluster


class PrometheusError(RuntimeError):
    """Prometheus answered an API call with an error (the message is Prometheus's own)."""


@dataclass(frozen=True)
class Target:
    """One /metrics endpoint, with the target labels the Operator would give a facade pod."""

    address: str  # host:port
    pod: str = "tiw-facade-0"
    namespace: str = NAMESPACE
    extra: Mapping[str, str] = field(default_factory=dict)

    def labels(self) -> dict[str, str]:
        return {"namespace": self.namespace, "pod": self.pod, **self.extra}


def write_rules(out: Path, prometheus_rule: Path = PROMETHEUS_RULE) -> list[str]:
    """The PrometheusRule's ``spec.groups`` as a plain rule file (as check_deploy.sh extracts them);
    returns the alert names."""
    resource = yaml.safe_load(prometheus_rule.read_text())
    groups = resource["spec"]["groups"]
    out.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


class Prometheus:
    def __init__(
        self,
        targets: Sequence[Target],
        *,
        prometheus_rule: Path | None = PROMETHEUS_RULE,
        interval: float = 1.0,
    ) -> None:
        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="tiw-prometheus-"))
        self._process: subprocess.Popen[bytes] | None = None
        self.alert_names: list[str] = []
        rule_files = []
        if prometheus_rule is not None:
            rules = self._dir / "rules.yaml"
            self.alert_names = write_rules(rules, prometheus_rule)
            rule_files.append(str(rules))
        every = f"{int(interval * 1000)}ms"
        config = {
            # scrape_timeout must not exceed the interval (its default, 10 s, would).
            "global": {"scrape_interval": every, "scrape_timeout": every, "evaluation_interval": every},
            "rule_files": rule_files,
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "metrics_path": "/metrics",
                    "static_configs": [
                        {"targets": [target.address], "labels": target.labels()} for target in targets
                    ],
                }
            ],
        }
        self._config = self._dir / "prometheus.yml"
        self._config.write_text(yaml.safe_dump(config, sort_keys=False))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self._dir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 30.0) -> None:
        args = [
            PROMETHEUS,
            f"--config.file={self._config}",
            f"--storage.tsdb.path={self._dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with open(self._dir / "prometheus.log", "wb") as log:
            self._process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._process.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready on port {self.port} in {timeout} s:\n{self.log}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:  # not listening yet, or 503 while it loads
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- the HTTP API (https://prometheus.io/docs/prometheus/latest/querying/api/) ---

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``'s ``data``; an error answer raises PrometheusError with its text."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as exc:  # 400/422/503 carry the error as JSON
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        if body.get("warnings"):
            raise PrometheusError(f"{path} {params}: warnings {body['warnings']}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector (a scalar or string answer comes back as one sample)."""
        data = self.api("query", query=expr)
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": result}]
        return list(result)

    def alerts(self) -> list[dict[str, Any]]:
        """Every pending or firing alert, with ``labels`` and ``state``."""
        return list(self.api("alerts")["alerts"])

    def rules(self) -> list[dict[str, Any]]:
        """Every rule, with its ``health``, ``lastError`` and ``lastEvaluation``, over all groups."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]


def environment_has_prometheus() -> bool:
    return os.access(PROMETHEUS, os.X_OK)
