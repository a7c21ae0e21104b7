"""Links: frames (msgpack header, tensors out of band), credits, size limits, over a real
aiohttp WebSocket on 127.0.0.1."""
import asyncio

import msgpack
import pytest
import torch
from aiohttp import ClientSession, web

from e3.runtime.errors import WireError
from e3.runtime.link import Link, LinkClosedError, LinkFullError, LinkKind, decode_frame, encode_frame


def test_a_frame_carries_its_fields_and_tensors_bit_for_bit():
    tensors = [torch.randn(3, 4), torch.tensor([[True, False]]), torch.arange(5, dtype=torch.int64),
               torch.randn(2, 2).to(torch.bfloat16), torch.empty(0, 7)]
    frame = encode_frame(LinkKind.TO_WORKER, tensors, w=3, m={"k": 4, "src": [["r", 1, 0, 3]]})
    header, got = decode_frame(frame)
    assert header["k"] is LinkKind.TO_WORKER and header["w"] == 3 and header["m"]["src"] == [["r", 1, 0, 3]]
    assert [(t.dtype, tuple(t.shape)) for t in got] == [(t.dtype, tuple(t.shape)) for t in tensors]
    assert all(torch.equal(a, b) for a, b in zip(got, tensors))
    got[0][0, 0] = 99.0                       # writable: a copy of the frame, not the socket's bytes


def test_a_frame_is_no_pickle():
    frame = encode_frame(LinkKind.PING, [torch.zeros(2)], seq=1)
    assert b"torch" not in frame and b"\x80\x04" not in frame[:8]
    hlen = int.from_bytes(frame[:4], "big")
    assert msgpack.unpackb(frame[4:4 + hlen])["t"] == [["float32", [2]]]


@pytest.mark.parametrize("mangle, message", [
    (lambda f: f[:3], "shorter than its header length"),
    (lambda f: (10 ** 6).to_bytes(4, "big") + f[4:], "announces a 1000000-byte header"),
    (lambda f: f[:-1], "tensors need more bytes"),
    (lambda f: f + b"x", "1 bytes its header does not describe"),
    (lambda f: f[:4] + b"\xc1" + f[5:], "malformed frame header"),
])
def test_a_malformed_frame_is_a_wire_error(mangle, message):
    frame = encode_frame(LinkKind.PING, [torch.zeros(4)], seq=1)
    with pytest.raises(WireError, match=message):
        decode_frame(mangle(frame))


def test_unknown_kinds_and_dtypes_are_wire_errors():
    header = msgpack.packb({"k": 99, "t": []})
    with pytest.raises(WireError, match="malformed frame header"):
        decode_frame(len(header).to_bytes(4, "big") + header)
    header = msgpack.packb({"k": 5, "t": [["complex32", [1]]]})
    with pytest.raises(WireError, match="malformed frame tensors"):
        decode_frame(len(header).to_bytes(4, "big") + header + b"\0" * 4)


def test_frames_over_the_limit_are_refused_on_both_sides():
    with pytest.raises(WireError, match="exceeds the link's limit of 1000"):
        encode_frame(LinkKind.PING, [torch.zeros(1000)], max_bytes=1000)
    frame = encode_frame(LinkKind.PING, [torch.zeros(1000)])
    with pytest.raises(WireError, match="exceeds the link's limit of 1000"):
        decode_frame(frame, max_bytes=1000)


class Peers:
    """A server and a client Link over one WebSocket on 127.0.0.1; each records its frames."""

    def __init__(self, server_credits=2, client_credits=2, max_frame=1 << 20, ws_max=None, server_grants=False):
        """`server_grants`: the server gives back each data frame's credit as it takes it."""
        self.kw = dict(server_credits=server_credits, client_credits=client_credits, max_frame=max_frame)
        self.server_grants = server_grants
        self.ws_max = ws_max or max_frame
        self.server_got, self.client_got = [], []
        self.server_link: Link | None = None
        self._ready = None

    async def _handler(self, request):
        ws = web.WebSocketResponse(max_msg_size=self.ws_max)
        await ws.prepare(request)
        self.server_link = Link(ws, name="server", max_frame_bytes=self.kw["max_frame"],
                                recv_credits=self.kw["server_credits"], send_credits=self.kw["client_credits"])
        self._ready.set_result(None)
        await self.server_link.run_until_closed(self._server_frame)
        return ws

    def _server_frame(self, header, tensors):
        self.server_got.append((header, tensors))
        if self.server_grants and header.get("data"):
            self.server_link.grant(1)

    async def __aenter__(self):
        self._ready = asyncio.get_running_loop().create_future()
        app = web.Application()
        app.router.add_get("/link", self._handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.session = ClientSession()
        self.ws = await self.session.ws_connect(f"http://127.0.0.1:{port}/link", max_msg_size=self.ws_max)
        self.client = Link(self.ws, name="client", max_frame_bytes=self.kw["max_frame"],
                           recv_credits=self.kw["client_credits"], send_credits=self.kw["server_credits"])
        self.client.start(lambda h, t: self.client_got.append((h, t)))
        await self._ready
        return self

    async def __aexit__(self, *exc):
        await self.client.close()
        await self.session.close()
        await self.runner.cleanup()


async def until(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.01)


async def test_frames_arrive_in_order_with_their_tensors():
    async with Peers() as p:
        for i in range(5):
            p.client.send(LinkKind.TO_WORKER, [torch.full((2, 3), float(i))], w=i)
        await until(lambda: len(p.server_got) == 5)
        assert [h["w"] for h, _ in p.server_got] == list(range(5))
        assert all(torch.equal(t[0], torch.full((2, 3), float(i))) for i, (_, t) in enumerate(p.server_got))
        p.server_link.send(LinkKind.FROM_WORKER, w=9)
        await until(lambda: p.client_got)
        assert p.client_got[0][0]["w"] == 9


async def test_a_slow_receiver_back_pressures_its_sender():
    async with Peers(server_credits=2) as p:
        for i in range(5):
            p.client.send(LinkKind.TO_WORKER, data=True, w=i)
        await until(lambda: len(p.server_got) == 2)
        await asyncio.sleep(0.1)
        assert len(p.server_got) == 2 and p.client.pending == 3 and p.client.credits == 0
        p.client.send(LinkKind.HEARTBEAT)              # control frames go ahead of waiting data
        await until(lambda: len(p.server_got) == 3)
        assert p.server_got[2][0]["k"] is LinkKind.HEARTBEAT
        p.server_link.grant(1)                         # the receiver let go of one: one more flows
        await until(lambda: len(p.server_got) == 4)
        await asyncio.sleep(0.1)
        assert [h.get("w") for h, _ in p.server_got] == [0, 1, None, 2] and p.client.pending == 2
        p.server_link.grant(5)                         # only what it holds can be given back
        await until(lambda: len(p.server_got) == 6)
        assert p.client.pending == 0 and p.client.credits == 0


async def test_a_receiver_that_gives_credits_back_keeps_data_flowing():
    async with Peers(server_credits=2, server_grants=True) as p:
        for i in range(20):
            p.client.send(LinkKind.TO_WORKER, data=True, w=i)
        await until(lambda: len(p.server_got) == 20)
        assert [h["w"] for h, _ in p.server_got] == list(range(20))
        await until(lambda: p.client.credits == 2)


async def test_a_full_queue_refuses_rather_than_buffers():
    async with Peers(server_credits=1) as p:
        p.client.max_pending = 3
        p.client.send(LinkKind.TO_WORKER, data=True, w=0)
        await until(lambda: len(p.server_got) == 1)
        for i in range(1, 4):
            p.client.send(LinkKind.TO_WORKER, data=True, w=i)
        with pytest.raises(LinkFullError, match="3 frames wait for the peer's credits"):
            p.client.send(LinkKind.TO_WORKER, data=True, w=4)


async def test_a_peer_that_overruns_its_credits_loses_the_link():
    async with Peers(server_credits=1) as p:
        p.client.set_send_credits(5)                   # a peer that ignores what it was granted
        for i in range(3):
            p.client.send(LinkKind.TO_WORKER, data=True, w=i)
        reason = await asyncio.wait_for(p.server_link.closed, 5)
        assert "sent 2 data frames on 1 credits" in reason
        await asyncio.wait_for(p.client.closed, 5)


async def test_a_message_over_the_socket_limit_closes_the_link():
    async with Peers(max_frame=1 << 22, ws_max=64 * 1024) as p:
        p.client.send(LinkKind.TO_WORKER, [torch.zeros(32 * 1024)], w=0)   # 128 kB
        await asyncio.wait_for(p.server_link.closed, 5)
        assert p.server_got == []
        with pytest.raises(LinkClosedError):
            await asyncio.wait_for(p.client.closed, 5)
            p.client.send(LinkKind.HEARTBEAT)


async def test_a_frame_over_the_link_limit_is_refused_before_it_is_sent():
    async with Peers(max_frame=64 * 1024) as p:
        with pytest.raises(WireError, match="exceeds the link's limit"):
            p.client.send(LinkKind.TO_WORKER, [torch.zeros(32 * 1024)], w=0)
        p.client.send(LinkKind.HEARTBEAT)               # the link stays up
        await until(lambda: p.server_got)


async def test_goodbye_ends_the_link_on_both_sides():
    async with Peers() as p:
        await p.client.close("done here")
        assert await asyncio.wait_for(p.server_link.closed, 5) == "it said goodbye (done here)"
        assert p.server_link.goodbye == "done here" and p.client.goodbye is None
        assert p.client.closed.result() == "done here"
        with pytest.raises(LinkClosedError):
            p.client.send(LinkKind.HEARTBEAT)
