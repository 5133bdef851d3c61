"""A DNS server on 127.0.0.1 for tests: answers A queries for the names it is given, with TTL 0,
and an empty answer for everything else. gRPC channels use it through a target that names it
as the DNS authority: `dns://127.0.0.1:PORT/name:port`. A test changes a name's addresses while
channels resolve it, as a cluster's DNS does when a replica restarts at a new address."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterable


class DnsStub:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.records: dict[str, list[str]] = {}
        self.queries = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def set(self, name: str, addresses: Iterable[str]) -> None:
        self.records[name.lower().rstrip(".")] = list(addresses)

    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> DnsStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(512)
            except TimeoutError:
                continue
            reply = self._answer(query)
            if reply:
                self.sock.sendto(reply, peer)

    def _answer(self, query: bytes) -> bytes:
        if len(query) < 12:
            return b""
        ident, _flags, questions = struct.unpack(">HHH", query[:6])
        if questions != 1:
            return b""
        labels, offset = [], 12
        while offset < len(query) and query[offset]:
            length = query[offset]
            labels.append(query[offset + 1:offset + 1 + length].decode("ascii", "replace"))
            offset += 1 + length
        question_end = offset + 5
        qtype, _qclass = struct.unpack(">HH", query[offset + 1:question_end])
        self.queries += 1
        name = ".".join(labels).lower()
        addresses = self.records.get(name, []) if qtype == 1 else []
        known = name in self.records
        flags = 0x8180 if known else 0x8183  # a response, recursion available; NXDOMAIN if unknown
        header = struct.pack(">HHHHHH", ident, flags, 1, len(addresses), 0, 0)
        answers = b"".join(
            struct.pack(">HHHIH", 0xC00C, 1, 1, 0, 4) + socket.inet_aton(address) for address in addresses)
        return header + query[12:question_end] + answers
