"""A real Redis Cluster for tests: three primaries on free ports, no persistence, and either no
replicas or one per primary (``replicas=1``), so that killing a primary makes the cluster promote
its replica.

Formed with the cluster's own commands (CLUSTER ADDSLOTSRANGE, CLUSTER MEET, CLUSTER REPLICATE) over
plain sockets, so it needs neither redis-cli nor a client library's cluster support: what is being
tested (redis-py's RedisCluster through the facade) is not also what builds the cluster.
"""

from __future__ import annotations

import socket
import time

from support.redis_server import Processes, RedisServer, free_port

SLOTS = 16384
# A node's cluster bus listens on its port + 10000 (Redis's fixed offset).
BUS_OFFSET = 10000


def _bus_free(port: int) -> bool:
    if port + BUS_OFFSET > 65535:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port + BUS_OFFSET))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int]) -> int:
    """A free port whose bus port (+ 10000) is free too, not among ``taken``."""
    for _ in range(200):
        port = free_port()
        if port not in taken and port + BUS_OFFSET not in taken and _bus_free(port):
            return port
    raise RuntimeError("no free port with a free cluster bus port")


def command(port: int, *args: str, timeout: float = 2.0) -> bytes:
    """One command to one node in RESP, its raw reply (enough for +OK, bulk strings and errors)."""
    encoded = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(encoded)
        reply = sock.recv(65536)
        if reply.startswith(b"$"):  # a bulk string: read until its announced length has arrived
            header, _, body = reply.partition(b"\r\n")
            length = int(header[1:])
            while length >= 0 and len(body) < length + 2:
                more = sock.recv(65536)
                if not more:
                    break
                body += more
            return body[: max(length, 0)]
        if reply.startswith(b"-"):
            raise RuntimeError(f"redis :{port} {' '.join(args)}: {reply.decode().strip()}")
        return reply


def _connected(nodes: bytes) -> int:
    """How many nodes a CLUSTER NODES reply lists as connected (its 8th field; "disconnected" is not)."""
    return sum(1 for line in nodes.splitlines() if len(line.split()) > 7 and line.split()[7] == b"connected")


def _replicas_known(nodes: bytes) -> int:
    """How many replicas a CLUSTER NODES reply lists (flags, its 3rd field, hold "slave")."""
    return sum(1 for line in nodes.splitlines() if b"slave" in line.split()[2].split(b","))


def info(port: int, section: str) -> dict[str, str]:
    """One INFO section of one node, ``field: value``."""
    text = command(port, "INFO", section).decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and not line.startswith("#"))


class RedisCluster(Processes):
    """``with RedisCluster() as cluster: ... cluster.url (a seed node) ... cluster.ports``.

    ``replicas=1``: each primary has a replica (``replica_of(primary)``), which the others promote
    once they agree the primary has failed: after ``node_timeout_ms`` without an answer, plus an
    election of about a second.
    """

    def __init__(self, size: int = 3, *, replicas: int = 0, node_timeout_ms: int = 5000) -> None:
        assert replicas in (0, 1), "one replica per primary at most"
        taken: set[int] = set()
        nodes: list[RedisServer] = []
        for _ in range(size * (1 + replicas)):
            port = cluster_port(taken)
            taken |= {port, port + BUS_OFFSET}
            node = RedisServer(port)
            # Each node rewrites its nodes-<port>.conf; a relative name is in the node's own --dir,
            # removed with it.
            node.args = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(node_timeout_ms),
                # A replica's first sync at once, not after the default 5 s.
                "--repl-diskless-sync-delay", "0",
            )  # fmt: skip
            nodes.append(node)
        self.nodes = nodes
        self.primaries = nodes[:size]  # as formed: a failover makes a replica a primary
        self.replicas = nodes[size:]  # replicas[i] replicates primaries[i]
        # Contiguous slot ranges, one per primary, covering all 16384.
        self.ranges = [(i * SLOTS // size, (i + 1) * SLOTS // size - 1) for i in range(size)]

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """A seed node: any one node tells a cluster client where every slot is."""
        return self.nodes[0].url

    def start(self, timeout: float = 15.0) -> None:
        for node in self.nodes:
            node.start()
        for (first, last), primary in zip(self.ranges, self.primaries, strict=True):
            command(primary.port, "CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
        for port in self.ports[1:]:
            command(port, "CLUSTER", "MEET", "127.0.0.1", str(self.ports[0]))
        deadline = time.monotonic() + timeout
        for primary, replica in zip(self.primaries, self.replicas, strict=False):
            self._replicate(replica, primary, deadline)
        self._wait_ok(deadline)

    @staticmethod
    def _replicate(replica: RedisServer, primary: RedisServer, deadline: float) -> None:
        """CLUSTER REPLICATE, once the replica has heard of the primary through the gossip."""
        primary_id = command(primary.port, "CLUSTER", "MYID").decode()
        while True:
            try:
                command(replica.port, "CLUSTER", "REPLICATE", primary_id)
                return
            except RuntimeError:  # "Unknown node": not met yet
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _wait_ok(self, deadline: float) -> None:
        """Until every node knows every other (and every replica as one), says ``cluster_state:ok``,
        and every replica is in sync with its primary (gossip and the first sync take a moment)."""
        while True:
            states = {port: command(port, "CLUSTER", "INFO") for port in self.ports}
            views = {port: command(port, "CLUSTER", "NODES") for port in self.ports}
            if (
                all(b"cluster_state:ok" in state for state in states.values())
                and all(_connected(view) == len(self.ports) for view in views.values())
                and all(_replicas_known(view) == len(self.replicas) for view in views.values())
                and all(info(r.port, "replication").get("master_link_status") == "up" for r in self.replicas)
            ):
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"cluster not ok: {states}")
            time.sleep(0.05)

    def keyslot(self, key: str) -> int:
        # An integer reply, ":<slot>\r\n".
        return int(command(self.nodes[0].port, "CLUSTER", "KEYSLOT", key)[1:])

    def primary_of(self, slot: int) -> RedisServer:
        """The primary that serves ``slot`` as the cluster was formed (before any failover)."""
        (index,) = [i for i, (first, last) in enumerate(self.ranges) if first <= slot <= last]
        return self.primaries[index]

    def replica_of(self, primary: RedisServer) -> RedisServer:
        return self.replicas[self.primaries.index(primary)]

    @staticmethod
    def primary_offset(primary: RedisServer) -> int:
        return int(info(primary.port, "replication")["master_repl_offset"])

    @staticmethod
    def caught_up(replica: RedisServer, offset: int) -> bool:
        """Whether ``replica`` has applied its primary's stream up to ``offset``."""
        return int(info(replica.port, "replication").get("slave_repl_offset", -1)) >= offset

    @staticmethod
    def is_primary(node: RedisServer) -> bool:
        """Whether ``node`` is a primary now (a replica the cluster promoted says so at once)."""
        try:
            return info(node.port, "replication").get("role") == "master"
        except OSError:
            return False

    def close(self) -> None:
        for node in self.nodes:
            node.close()
