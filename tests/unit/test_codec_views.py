"""The copy-free decoding paths agree with the copying ones, byte for byte and
error for error (records.decode_all(copy=False), delta.check_chunk)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp_common import delta, records
from cdp_common.delta import Extent
from cdp_common.errors import FormatError

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
SIZES = {0: 1 << 20, 3: 1 << 16}


def _outcome(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return "ok", fn(*args)
    except FormatError as exc:
        return "error", str(exc)


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.binary(max_size=300),
                          st.integers(0, 3)), max_size=8),
       st.integers(0, 4000), st.binary(max_size=3))
def test_record_views_equal_copies(recs: list[tuple[int, int, bytes, int]], cut: int,
                                   junk: bytes) -> None:
    buf = b"".join(records.encode(i + 1, 7 * i, d, off, data, flags)
                   for i, (d, off, data, flags) in enumerate(recs))
    buf = buf[:cut] + junk if cut < len(buf) else buf

    def decode(copy: bool) -> list[tuple[int, int, int, int, bytes, int]]:
        return [(r.seq, r.time_ns, r.disk_id, r.offset, bytes(r.data), r.flags)
                for r in records.decode_all(buf, copy=copy)]

    assert _outcome(decode, False) == _outcome(decode, True)


def test_record_views_are_read_only_views() -> None:
    buf = memoryview(bytearray(records.encode(1, 2, 0, 4096, b"abc")
                               + records.encode(2, 3, 0, 0, b"xy")))
    first, second = records.decode_all(buf, copy=False)
    assert isinstance(first.data, memoryview) and first.data.readonly
    assert bytes(first.data) == b"abc" and bytes(second.data) == b"xy"
    assert first.length == 3
    copied = next(records.decode_all(buf))
    assert type(copied.data) is bytes


@SETTINGS
@given(st.binary(max_size=400))
def test_check_chunk_agrees_on_garbage(buf: bytes) -> None:
    ok, dec = _outcome(delta.decode_chunk, buf, SIZES)
    assert _outcome(delta.check_chunk, buf, SIZES) == (ok, len(dec) if ok == "ok" else dec)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from([0, 3]), st.integers(0, 60000), st.integers(1, 5000),
                          st.booleans()), max_size=6), st.integers(0, 5000))
def test_check_chunk_agrees_on_chunks(specs: list[tuple[int, int, int, bool]], cut: int) -> None:
    extents = [Extent(d, off, n, None if zero else bytes([n % 251]) * n)
               for d, off, n, zero in specs]
    buf = b"".join(delta.encode_extent(e) for e in extents)
    for candidate in (buf, buf[:cut]):
        ok, dec = _outcome(delta.decode_chunk, candidate, SIZES)
        assert _outcome(delta.check_chunk, candidate, SIZES) == (
            ok, len(dec) if ok == "ok" else dec)
    if buf:
        assert delta.check_chunk(buf, SIZES) == len(extents)
    with pytest.raises(FormatError):
        delta.check_chunk(b"\0" * 5, SIZES)
