"""grpcio (not written by us) as a proxyless xDS client and as a plain gRPC server, for
tests/pilot_grpc.rs.

  grpc_xds.py serve NAME          serve /tessera.test.Who/Name (answers NAME) on 127.0.0.1:<free
                                  port>; prints the port, then serves until stdin closes
  grpc_xds.py call TARGET [AUTHORITY]
                                  calls /tessera.test.Who/Name through TARGET (`xds:///host:port`
                                  resolves through the control plane named by GRPC_XDS_BOOTSTRAP;
                                  `127.0.0.1:port` with AUTHORITY goes through a sidecar) and
                                  prints the answer; exits 1 with the error otherwise
"""
import sys
from concurrent import futures

import grpc

METHOD = "/tessera.test.Who/Name"


def serve(name):
    answer = name.encode()

    def handler(req, ctx):
        return answer

    rpc = grpc.unary_unary_rpc_method_handler(handler)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("tessera.test.Who", {"Name": rpc}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0)


def call(target, authority=None):
    options = [("grpc.default_authority", authority)] if authority else []
    with grpc.insecure_channel(target, options=options) as ch:
        stub = ch.unary_unary(METHOD)
        try:
            print(stub(b"", timeout=10).decode(), flush=True)
        except grpc.RpcError as e:
            print(f"{e.code()}: {e.details()}", file=sys.stderr, flush=True)
            sys.exit(1)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        call(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
