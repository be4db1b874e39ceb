"""A gRPC peer for Tessera's interop tests, on grpcio (not written by us).

  grpc_peer.py serve          start a server on 127.0.0.1:<free port>, print the port, serve
  grpc_peer.py call TARGET    call every method through TARGET, print the results as JSON
  grpc_peer.py call TARGET --tls CA NAME [CERT KEY]
                              the same over TLS: trust CA, expect the server to be NAME (also the
                              SNI), and present CERT/KEY for mutual TLS when given

The server also runs grpcio's own grpc.health.v1 service (package grpcio-health-checking) and
reads commands on stdin: `down` sets tessera.test.Echo to NOT_SERVING, `up` to SERVING.
Messages are raw bytes (no generated code).
"""
import json
import sys
from concurrent import futures

import grpc

SERVICE = "tessera.test.Echo"


def unary(req, ctx):
    ctx.set_trailing_metadata((("x-trailer", "unary-done"),))
    return b"unary:" + req


def server_stream(req, ctx):
    for i in range(5):
        yield req + b"-" + str(i).encode()
    ctx.set_trailing_metadata((("x-count", "5"),))


def client_stream(it, ctx):
    return b"+".join(m for m in it)


def bidi(it, ctx):
    for m in it:
        yield b"echo:" + m


def fail(req, ctx):
    ctx.abort(grpc.StatusCode.FAILED_PRECONDITION, "deliberate failure")


def metadata(req, ctx):
    md = dict(ctx.invocation_metadata())
    keys = ("x-client", "x-forwarded-for", "x-request-id", "x-forwarded-client-cert", "x-forwarded-proto")
    return json.dumps({k: md.get(k) for k in keys}).encode()


def serve():
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Metadata": grpc.unary_unary_rpc_method_handler(metadata),
    }
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    checker = health.HealthServicer()
    checker.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "down":
            checker.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        elif cmd == "up":
            checker.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        print("ok " + cmd, flush=True)
    server.wait_for_termination()


def call(target, tls=None):
    if tls:
        read = lambda p: open(p, "rb").read()
        ca, name = tls[0], tls[1]
        key = read(tls[3]) if len(tls) > 3 else None
        chain = read(tls[2]) if len(tls) > 3 else None
        creds = grpc.ssl_channel_credentials(read(ca), key, chain)
        ch = grpc.secure_channel(target, creds, options=(("grpc.ssl_target_name_override", name),))
    else:
        ch = grpc.insecure_channel(target)
    m = lambda name: "/%s/%s" % (SERVICE, name)
    out = {}
    resp, c = ch.unary_unary(m("Unary")).with_call(b"hi", timeout=10)
    out["unary"] = resp.decode()
    out["unary_trailer"] = dict(c.trailing_metadata()).get("x-trailer")
    c = ch.unary_stream(m("ServerStream"))(b"n", timeout=10)
    out["server_stream"] = [x.decode() for x in c]
    out["server_stream_trailer"] = dict(c.trailing_metadata()).get("x-count")
    out["client_stream"] = ch.stream_unary(m("ClientStream"))(iter([b"a", b"b", b"c"]), timeout=10).decode()
    out["bidi"] = [x.decode() for x in ch.stream_stream(m("Bidi"))(iter([b"1", b"2", b"3"]), timeout=10)]
    try:
        ch.unary_unary(m("Fail"))(b"x", timeout=10)
        out["fail"] = None
    except grpc.RpcError as e:
        out["fail"] = [e.code().name, e.details()]
    out["metadata"] = json.loads(ch.unary_unary(m("Metadata"))(b"", metadata=(("x-client", "py"),), timeout=10))
    try:
        ch.unary_unary("/no.Such/Method")(b"x", timeout=10)
        out["unimplemented"] = None
    except grpc.RpcError as e:
        out["unimplemented"] = e.code().name
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    else:
        call(sys.argv[2], sys.argv[4:] if len(sys.argv) > 3 and sys.argv[3] == "--tls" else None)
