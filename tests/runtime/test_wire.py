"""Typed msgpack frames between node and workers."""
import asyncio
import socket
import struct

import pytest

from e3.runtime.errors import WireError
from e3.runtime.wire import MAX_FRAME, BlockingChannel, Kind, pack, read_frame, unpack


def test_round_trip_keeps_kind_and_bytes():
    frame = pack(Kind.DONE, id=3, logits=b"\x00\x01", observed={2: 5})
    msg = unpack(frame[4:])
    assert msg == {"k": Kind.DONE, "id": 3, "logits": b"\x00\x01", "observed": {2: 5}}
    assert isinstance(msg["k"], Kind)


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\x01\x02\x03", pack(Kind.RUN)[4:].replace(b"\x04", b"\x7f")])
def test_malformed_frames_are_wire_errors(body):
    with pytest.raises(WireError, match="malformed frame"):
        unpack(body)


async def test_async_reader_handles_clean_end_and_truncation():
    reader = asyncio.StreamReader()
    reader.feed_data(pack(Kind.READY, epoch=1))
    reader.feed_data(b"\x00\x00")
    reader.feed_eof()
    assert (await read_frame(reader))["epoch"] == 1
    with pytest.raises(WireError, match="inside a frame header"):
        await read_frame(reader)
    empty = asyncio.StreamReader()
    empty.feed_eof()
    assert await read_frame(empty) is None


async def test_oversized_announcement_is_refused():
    reader = asyncio.StreamReader()
    reader.feed_data(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(WireError, match="limit"):
        await read_frame(reader)


def test_blocking_channel_over_a_socket_pair():
    a, b = socket.socketpair()
    with a, b:
        BlockingChannel(a).send(Kind.HELLO, worker=7, pid=1)
        assert BlockingChannel(b).recv()["worker"] == 7
        a.shutdown(socket.SHUT_WR)
        assert BlockingChannel(b).recv() is None
