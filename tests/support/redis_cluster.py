"""A real three-node Redis Cluster for tests: free ports, no replicas, no persistence.

Formed with the cluster's own commands (CLUSTER ADDSLOTSRANGE, CLUSTER MEET) over plain sockets, so
it needs neither redis-cli nor a client library's cluster support: what is being tested (redis-py's
RedisCluster through the facade) is not also what builds the cluster.
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


class RedisCluster(Processes):
    """``with RedisCluster() as cluster: ... cluster.url (a seed node) ... cluster.ports``."""

    def __init__(self, size: int = 3) -> None:
        taken: set[int] = set()
        self.nodes: list[RedisServer] = []
        for _ in range(size):
            port = cluster_port(taken)
            taken |= {port, port + BUS_OFFSET}
            node = RedisServer(port)
            # Each node rewrites its nodes-<port>.conf; a relative name is in the node's own --dir,
            # removed with it.
            node.args = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "5000",
            )  # fmt: skip
            self.nodes.append(node)

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
        # Contiguous slot ranges, one per node, covering all 16384.
        size = len(self.nodes)
        for index, port in enumerate(self.ports):
            first, last = index * SLOTS // size, (index + 1) * SLOTS // size - 1
            command(port, "CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
        for port in self.ports[1:]:
            command(port, "CLUSTER", "MEET", "127.0.0.1", str(self.ports[0]))
        self._wait_ok(time.monotonic() + timeout)

    def _wait_ok(self, deadline: float) -> None:
        """Until every node knows every other and says ``cluster_state:ok`` (gossip takes a moment)."""
        while True:
            states = {port: command(port, "CLUSTER", "INFO") for port in self.ports}
            known = {port: _connected(command(port, "CLUSTER", "NODES")) for port in self.ports}
            if all(b"cluster_state:ok" in info for info in states.values()) and all(
                count == len(self.ports) for count in known.values()
            ):
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"cluster not ok: {states}")
            time.sleep(0.05)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
