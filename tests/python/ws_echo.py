"""WebSocket echo server and client for the latchkey e2e tests (tests/e2e/websocket.rs), with
the `websockets` package (PyPI).

    ws_echo.py server CERT KEY LOG   serve TLS on 127.0.0.1:0, print the port; log each
                                     handshake's path and headers to LOG (one JSON a line)
    ws_echo.py echo URL N SIZE       through the proxy in HTTPS_PROXY (CA in SSL_CERT_FILE):
                                     send N messages of SIZE bytes (text and binary), check
                                     each echo, print one JSON result
    ws_echo.py hold URL              connect, one echo, print "open", then wait for the server
                                     side to end: print how the connection closed
"""
import asyncio
import json
import ssl
import sys
import time

import websockets

AGENT_OWN = "agent-own-credential-1234"


async def serve(cert, key, log_path):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    async def handler(ws):
        req = ws.request
        with open(log_path, "a") as f:
            f.write(json.dumps({"path": req.path, "headers": dict(req.headers.raw_items())}) + "\n")
        try:
            async for msg in ws:
                await ws.send(msg)
        except websockets.ConnectionClosed:
            pass  # the revocation and expiry tests cut sessions off on purpose

    async with websockets.serve(handler, "127.0.0.1", 0, ssl=ctx, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def echo(url, n, size):
    start = time.monotonic()
    # No permessage-deflate here, so the audit line's byte counts can be checked against what
    # was sent (`hold` keeps the default, compression negotiated through latchkey).
    async with websockets.connect(
        url,
        additional_headers={"Authorization": "Bearer " + AGENT_OWN},
        max_size=None,
        compression=None,
    ) as ws:
        sent = 0
        for i in range(n):
            msg = ("t%d-" % i + "x" * size)[:size] if i % 2 == 0 else bytes([i % 256]) * size
            await ws.send(msg)
            back = await ws.recv()
            assert back == msg, "echo %d differs" % i
            sent += len(msg)
    elapsed = time.monotonic() - start
    print(json.dumps({"ok": True, "messages": n, "bytes": sent, "seconds": elapsed}), flush=True)


async def hold(url):
    async with websockets.connect(url, additional_headers={"Authorization": "Bearer " + AGENT_OWN}) as ws:
        await ws.send("ping")
        assert await ws.recv() == "ping"
        print("open", flush=True)
        try:
            await asyncio.wait_for(ws.recv(), 30)
            print("message", flush=True)
        except websockets.ConnectionClosed as e:
            print("closed %s" % (e.rcvd.code if e.rcvd else "abnormal"), flush=True)
        except asyncio.TimeoutError:
            print("still open", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "server":
        asyncio.run(serve(*sys.argv[2:5]))
    elif mode == "echo":
        asyncio.run(echo(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        asyncio.run(hold(sys.argv[2]))
