"""Bare echo servers: the raw transports that ``aiosyft bench transport`` measures against.

Run as ``python -m runners.echo ws|tcp``; prints ``READY <address>`` and echoes every WebSocket
message or length-prefixed TCP record until stopped. No protocol, no worker: the floor.
"""

from __future__ import annotations

import asyncio
import struct
import sys

from aiohttp import web

_LENGTH = struct.Struct("<I")


async def _ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=1 << 30, compress=False)
    await ws.prepare(request)
    async for message in ws:
        await ws.send_bytes(message.data)
    return ws


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
            writer.write(_LENGTH.pack(length) + await reader.readexactly(length))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def serve(kind: str) -> None:
    if kind == "ws":
        app = web.Application()
        app.router.add_get("/", _ws_echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"READY ws://127.0.0.1:{port}/", flush=True)
    else:
        server = await asyncio.start_server(_tcp_echo, "127.0.0.1", 0, limit=1 << 27)
        print(f"READY tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.get_running_loop().create_future()  # until killed


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
