"""gRPC server and client for the latchkey e2e tests (tests/e2e/grpc.rs), with hand-written
generic handlers (bytes in, bytes out: no generated code).

    grpc_echo.py server CERT KEY LOG      serve TLS on 127.0.0.1:0, print the port, log every
                                          call's method and metadata to LOG (one JSON a line)
    grpc_echo.py client TARGET SERVICE    run every case against SERVICE through the proxy in
                                          https_proxy (CA in GRPC_DEFAULT_SSL_ROOTS_FILE_PATH)
                                          and print one JSON object of results

Both services (`cred.Echo`, `open.Echo`) have the same methods; the tests give them routes
with and without an injected credential.
"""
import json
import sys
import threading
import time
from concurrent import futures

import grpc

AGENT_OWN = "agent-own-credential-1234"
ident = lambda b: b  # noqa: E731


def serve(cert, key, log_path):
    log_lock = threading.Lock()

    def record(ctx, method, **extra):
        md = {k: v for k, v in ctx.invocation_metadata()}
        with log_lock, open(log_path, "a") as f:
            f.write(json.dumps({"method": method, "metadata": md, **extra}) + "\n")

    def unary_ok(req, ctx):
        record(ctx, "Ok")
        ctx.set_trailing_metadata((("x-trailer", "after-data"),))
        return b"echo:" + req

    def unary_denied(req, ctx):
        record(ctx, "Denied")
        # Nothing sent yet: grpc answers trailers-only (one HEADERS frame, END_STREAM).
        ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "no access to this resource")

    def stream_then_fail(req, ctx):
        record(ctx, "StreamThenFail")
        yield b"first"
        ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "failed after data")

    def server_stream(req, ctx):
        record(ctx, "ServerStream")
        for i in range(int(req.decode() or "5")):
            yield b"msg-%d" % i

    def bidi(reqs, ctx):
        record(ctx, "Bidi")
        for r in reqs:
            yield b"bidi:" + r

    def slow(req, ctx):
        record(ctx, "Slow")
        for _ in range(100):
            if not ctx.is_active():
                break
            time.sleep(0.1)
        return b"late"

    def endless(req, ctx):
        cancelled = threading.Event()
        ctx.add_callback(cancelled.set)
        record(ctx, "Endless")
        try:
            for i in range(600):
                if cancelled.is_set():
                    break
                yield b"tick-%d" % i
                time.sleep(0.05)
        finally:
            # When grpc notices the cancellation while sending a tick, it abandons this
            # generator at its `yield` (GeneratorExit), so the end is recorded here, not after
            # the loop; the callback may run a moment after that.
            cancelled.wait(5)
            with log_lock, open(log_path, "a") as f:
                f.write(json.dumps({"method": "EndlessEnded", "cancelled": cancelled.is_set()}) + "\n")

    handlers = {
        "Ok": grpc.unary_unary_rpc_method_handler(unary_ok, ident, ident),
        "Denied": grpc.unary_unary_rpc_method_handler(unary_denied, ident, ident),
        "StreamThenFail": grpc.unary_stream_rpc_method_handler(stream_then_fail, ident, ident),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, ident, ident),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, ident, ident),
        "Slow": grpc.unary_unary_rpc_method_handler(slow, ident, ident),
        "Endless": grpc.unary_stream_rpc_method_handler(endless, ident, ident),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    for svc in ("cred.Echo", "open.Echo"):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(svc, handlers),))
    creds = grpc.ssl_server_credentials(((open(key, "rb").read(), open(cert, "rb").read()),))
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    print(port, flush=True)
    # Until the test closes our stdin (or dies).
    sys.stdin.read()
    server.stop(0)


def client(target, service):
    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials())
    md = (("authorization", "Bearer " + AGENT_OWN), ("x-case", "grpc"))
    out = {}

    def call(name, fn):
        try:
            out[name] = fn()
        except grpc.RpcError as e:
            out[name] = {"code": e.code().name, "details": e.details()}

    def ok():
        resp, c = channel.unary_unary(f"/{service}/Ok").with_call(b"hi", metadata=md, timeout=20)
        return {"code": "OK", "body": resp.decode(), "trailers": dict(c.trailing_metadata())}

    call("ok", ok)
    call("denied", lambda: channel.unary_unary(f"/{service}/Denied")(b"x", metadata=md, timeout=20))

    def stream_then_fail():
        got = []
        try:
            for m in channel.unary_stream(f"/{service}/StreamThenFail")(b"", metadata=md, timeout=20):
                got.append(m.decode())
        except grpc.RpcError as e:
            return {"code": e.code().name, "details": e.details(), "got": got}
        return {"code": "OK", "got": got}

    call("stream_then_fail", stream_then_fail)
    call("server_stream", lambda: {"code": "OK", "got": [m.decode() for m in channel.unary_stream(f"/{service}/ServerStream")(b"5", metadata=md, timeout=20)]})

    def bidi():
        msgs = iter([b"a", b"b", b"c"])
        return {"code": "OK", "got": [m.decode() for m in channel.stream_stream(f"/{service}/Bidi")(msgs, metadata=md, timeout=20)]}

    call("bidi", bidi)
    call("deadline", lambda: channel.unary_unary(f"/{service}/Slow")(b"", metadata=md, timeout=1.0))

    def cancel():
        it = channel.unary_stream(f"/{service}/Endless")(b"", metadata=md, timeout=30)
        got = [next(it).decode(), next(it).decode()]
        it.cancel()
        try:
            for _ in it:
                pass
        except grpc.RpcError as e:
            return {"code": e.code().name, "got": got}
        return {"code": "OK", "got": got}

    call("cancel", cancel)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(*sys.argv[2:5])
    else:
        client(*sys.argv[2:4])
