"""A real Sentinel-watched pair for failover tests: a primary, one replica, three sentinels.

Everything is a real process on its own free port; ``primary.kill()`` is a crash the sentinels
must notice (after ``down-after-milliseconds``) and repair by promoting the replica.
"""

from __future__ import annotations

import os
import time

from redis import Redis

from support.redis_server import Processes, RedisServer

MASTER = "tiw-failover"


class Sentinel(RedisServer):
    """``redis-server <conf> --sentinel`` with quick failure detection, quorum 2 of 3."""

    def __init__(self, primary: RedisServer, name: str, *, down_after_ms: int = 1000) -> None:
        super().__init__(args=("--sentinel",))
        # Sentinel rewrites its configuration file (the other sentinels, the new master): each needs
        # its own, writable, in its own temp dir.
        self.config_file = os.path.join(self._dir, "sentinel.conf")
        with open(self.config_file, "w") as file:
            file.write(
                f"port {self.port}\n"
                f"sentinel monitor {name} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
                f"sentinel failover-timeout {name} 5000\n"
                f"sentinel parallel-syncs {name} 1\n"
            )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class SentinelTopology(Processes):
    """``with SentinelTopology() as t: ... t.primary.kill() ... t.wait_for_failover()``.

    Entered only once every sentinel sees the replica and the two other sentinels: before that a
    kill of the primary could not be repaired (no replica known, or no quorum to elect a leader).
    """

    def __init__(self, name: str = MASTER) -> None:
        self.name = name
        self.primary = RedisServer()
        self.replica = RedisServer(args=("--replicaof", "127.0.0.1", str(self.primary.port)))
        self.sentinels = [Sentinel(self.primary, name) for _ in range(3)]

    @property
    def addresses(self) -> str:
        """For TIW_REDIS_SENTINELS."""
        return ",".join(sentinel.address for sentinel in self.sentinels)

    def start(self, timeout: float = 30.0) -> None:
        self.primary.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        deadline = time.monotonic() + timeout
        while not self._formed():
            if time.monotonic() > deadline:
                raise RuntimeError("the sentinels did not find the replica and each other in time")
            time.sleep(0.1)

    def _formed(self) -> bool:
        if self.replication(self.replica).get("master_link_status") != "up":
            return False
        for sentinel in self.sentinels:
            with Redis(port=sentinel.port, socket_timeout=1.0) as client:
                replicas = client.execute_command("SENTINEL", "REPLICAS", self.name)
                peers = client.execute_command("SENTINEL", "SENTINELS", self.name)
            if len(replicas) != 1 or len(peers) != len(self.sentinels) - 1:
                return False
        return True

    @staticmethod
    def replication(server: RedisServer) -> dict[str, object]:
        with Redis(port=server.port, socket_timeout=1.0) as client:
            info: dict[str, object] = client.info("replication")
            return info

    def replica_caught_up(self, offset: int) -> bool:
        """Whether the replica has applied the primary's stream up to ``offset``."""
        found = self.replication(self.replica).get("slave_repl_offset", -1)
        return isinstance(found, int) and found >= offset

    def primary_offset(self) -> int:
        offset = self.replication(self.primary)["master_repl_offset"]
        assert isinstance(offset, int)
        return offset

    def master_port(self) -> int | None:
        """The master's port as a majority of the sentinels name it (None: no majority yet)."""
        named: list[int] = []
        for sentinel in self.sentinels:
            try:
                with Redis(port=sentinel.port, socket_timeout=1.0) as client:
                    _, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
                named.append(int(port))
            except Exception:  # a sentinel that does not answer names nobody
                continue
        for port in set(named):
            if named.count(port) * 2 > len(self.sentinels):
                return port
        return None

    def close(self) -> None:
        for server in [*self.sentinels, self.replica, self.primary]:
            server.close()
