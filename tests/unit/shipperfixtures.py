"""A shipper over a real journal and image, for the shipper tests (gRPC and in-memory sink)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from cdp_common import records
from cdp_common.config import TlsConfig
from cdp_filter.journal import Journal
from cdp_filter.policy import Disk, PolicyRuntime
from cdp_filter.shipper import Shipper
from cdp_filter.sink import RecordSink

TLS = TlsConfig(insecure=True)
H = records.HEADER_SIZE


async def eventually(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Rig:
    def __init__(self, tmp: Path, seg_bytes: int = 10 * (H + 100), cap: int = 1 << 30,
                 sink: RecordSink | None = None) -> None:
        self.tmp = tmp
        self.sink = sink
        img = tmp / "d.img"
        fd = os.open(img, os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 1 << 20)
        self.disk = Disk("d", "p", 0, 1 << 20, str(img), fd=fd)
        self.journal = Journal.open(str(tmp / "journal"), seg_bytes, cap, policy="p")
        self.rt = PolicyRuntime("p", self.journal, [self.disk])
        self.shipper = self.new_shipper()
        self.task: asyncio.Task[None] | None = None

    def new_shipper(self) -> Shipper:
        return Shipper(self.rt, "filter-1", [self.disk.info()], TLS, 8 << 20, 4 * (H + 100),
                       str(self.tmp / "assignment.p.json"), sink=self.sink)

    def write(self, count: int) -> None:
        for _ in range(count):
            seq = self.journal.last_seq + 1
            self.journal.append(seq, 0, 0, bytes([seq % 256]) * 100)
        self.rt.appended.set()

    def start(self) -> None:
        self.task = asyncio.create_task(self.shipper.run())

    async def close(self) -> None:
        self.rt.close()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.journal.close()
        os.close(self.disk.fd)
