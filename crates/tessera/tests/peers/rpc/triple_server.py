#!/usr/bin/env python3
"""Triple (gRPC-compatible HTTP/2) server built on PyPI apache-dubbo 3.0.0b1. See README.md.

Serves --interface (default org.apache.dubbo.samples.HelloWorld) method `unary`: raw bytes in -> NAME + ":" + input out
(no serializer, as in the package's helloworld sample). Prints `listening <port>` once bound; stderr gets
`event request <path> version=<v> group=<g>` per request.
"""
import argparse
import socket
import sys
import threading

import dubbo
from dubbo.configs import ServiceConfig
from dubbo.proxy.handlers import RpcMethodHandler, RpcServiceHandler
from dubbo.protocol.triple.stream import server_stream
from dubbo.protocol.triple.status import TriRpcStatus
from dubbo.protocol.triple.constants import GRpcCode


def main():
    ap = argparse.ArgumentParser(description="Triple test server")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--interface", default="org.apache.dubbo.samples.HelloWorld")
    ap.add_argument("--version", default=None, help="if set, reject requests whose tri-service-version differs")
    ap.add_argument("--group", default=None, help="if set, reject requests whose tri-service-group differs")
    a = ap.parse_args()
    name = a.name.encode()

    def ev(line):
        sys.stderr.write("event " + line + "\n")
        sys.stderr.flush()

    # Report each request's routing headers; optionally enforce version/group like a Java Triple provider
    # (the package itself ignores tri-service-version / tri-service-group).
    listener = server_stream.ServerTransportListener
    orig_on_headers = listener.on_headers

    def on_headers(self, headers, end_stream):
        v = headers.get("tri-service-version", "")
        g = headers.get("tri-service-group", "")
        ev(f"request {headers.path} version={v} group={g}")
        if (a.version is not None and v != a.version) or (a.group is not None and g != a.group):
            self._response_error(TriRpcStatus(
                GRpcCode.UNIMPLEMENTED,
                description=f"Service {headers.path} is not found (version={v!r}, group={g!r})"))
            return
        return orig_on_headers(self, headers, end_stream)

    listener.on_headers = on_headers

    def unary(request):
        return name + b":" + bytes(request)

    handler = RpcServiceHandler(
        service_name=a.interface,
        method_handlers=[RpcMethodHandler.unary(unary, method_name="unary")],
    )

    # ServiceConfig treats port 0 as "default port 50051", so pick a free port ourselves for --port 0.
    for attempt in range(5):
        port = a.port
        if port == 0:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
        try:
            dubbo.Server(ServiceConfig(handler, host="127.0.0.1", port=port)).start()
            break
        except Exception as e:  # RemotingError when the port is taken
            if a.port != 0 or attempt == 4:
                sys.stderr.write(f"fatal: {e!r}\n")
                sys.exit(1)
    print(f"listening {port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
