"""`agent.devcluster.bridge.TlsBridge`: a loopback TLS service reached at another address with a
certificate for that address (how the real node's pods reach the API server and the fabric
emulator); the HTTP inside passes unchanged, and `stop()` ends kept-alive connections too."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
from aiohttp import web

from agent import pki
from agent.devcluster.bridge import TlsBridge, serving_context


async def test_a_client_trusting_the_bridges_ca_reaches_the_service_through_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "up").mkdir()
    ca, ca_key, ca_cert = pki.load_or_make_ca(tmp_path / "up", "upstream-ca")
    serving = pki.issue(
        tmp_path / "up", "srv", ca_key=ca_key, ca_cert=ca_cert, cn="up", server_names=("127.0.0.1",)
    )

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.headers.get('Authorization')}")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    up_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    up_ctx.load_cert_chain(str(serving.cert), str(serving.key))
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=up_ctx).start()
    port = runner.addresses[0][1]
    # another loopback address stands in for the node's: the certificate names it only
    ctx, _ = serving_context(ca.cert, ca.key, tmp_path / "bridge", "b", "127.0.0.2")
    bridge = TlsBridge("127.0.0.2", ctx, "127.0.0.1", port, ca.cert)
    await asyncio.to_thread(bridge.start)
    try:
        client = ssl.create_default_context(cafile=str(ca.cert))
        async with aiohttp.ClientSession() as session:
            for n in range(3):  # one kept-alive connection
                async with session.get(
                    f"https://{bridge.address}/", ssl=client, headers={"Authorization": f"t{n}"}
                ) as resp:
                    assert (resp.status, await resp.text()) == (200, f"t{n}")
            await asyncio.to_thread(bridge.stop)  # with that connection still open
            try:
                async with session.get(f"https://{bridge.address}/", ssl=client) as resp:
                    raise AssertionError(f"answered after stop: {resp.status}")
            except aiohttp.ClientError:
                pass
    finally:
        await asyncio.to_thread(bridge.stop)
        await runner.cleanup()


async def test_stop_closes_a_connection_still_in_its_tls_handshake(tmp_path: Path) -> None:
    """A client that connected and never finished its handshake is closed by `stop()`, not left
    open (its socket is one of the connections `stop()` ends)."""
    (tmp_path / "up").mkdir()
    ca, _, _ = pki.load_or_make_ca(tmp_path / "up", "upstream-ca")
    ctx, _ = serving_context(ca.cert, ca.key, tmp_path / "bridge", "b", "127.0.0.2")
    bridge = TlsBridge("127.0.0.2", ctx, "127.0.0.1", 9, ca.cert)
    await asyncio.to_thread(bridge.start)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.2", bridge.port)
        writer.write(b"\x16\x03\x01")  # the start of a ClientHello, and nothing more
        await writer.drain()
        await asyncio.sleep(0.2)
        await asyncio.to_thread(bridge.stop)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the bridge
        writer.close()
    finally:
        await asyncio.to_thread(bridge.stop)
