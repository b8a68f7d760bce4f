"""Shared helpers of the proxy tests (a plain module, no fixtures): the disks of
a test policy and `Writer`, which makes journal records and keeps the oracle
disks they should produce."""

from __future__ import annotations

import os
import random

from cdp_common import records
from cdp_common.pb.cdp.v1 import replication_pb2 as rpb

DISKS = [rpb.DiskInfo(disk_id=0, name="d0", size_bytes=1 << 20),
         rpb.DiskInfo(disk_id=1, name="d1", size_bytes=256 << 10)]


class Writer:
    """Generates journal records and keeps the oracle disks."""

    def __init__(self, start_seq: int = 0) -> None:
        self.seq = start_seq
        self.oracle = {d.disk_id: bytearray(d.size_bytes) for d in DISKS}
        self.rng = random.Random(7)

    def record(self, disk: int, offset: int, data: bytes) -> bytes:
        self.seq += 1
        self.oracle[disk][offset:offset + len(data)] = data
        return records.encode(self.seq, 1_000_000 + self.seq, disk, offset, data)

    def random_batch(self, n: int) -> bytes:
        out = []
        for _ in range(n):
            disk = self.rng.choice([0, 1])
            size = DISKS[disk].size_bytes
            kind = self.rng.random()
            length = self.rng.choice([512, 4096, 8192, 65536])
            offset = self.rng.randrange(0, size - length + 1, 512)
            if kind < 0.2:
                data = bytes(length)
            elif kind < 0.5:
                data = bytes([self.rng.randrange(256)]) * length
            else:
                data = os.urandom(length)
            out.append(self.record(disk, offset, data))
        return b"".join(out)
