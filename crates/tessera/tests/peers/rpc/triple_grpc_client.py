#!/usr/bin/env python3
"""grpcio generic unary client for Triple servers (Triple unary == gRPC). One JSON line per call. See README.md."""
import argparse
import json

import grpc


def main():
    ap = argparse.ArgumentParser(description="gRPC (grpcio) client for a Triple server")
    ap.add_argument("--target", required=True, help="HOST:PORT")
    ap.add_argument("--interface", default="org.apache.dubbo.samples.HelloWorld")
    ap.add_argument("--method", default="unary")
    ap.add_argument("--data", required=True)
    ap.add_argument("--version", default=None, help="sent as tri-service-version metadata")
    ap.add_argument("--group", default=None, help="sent as tri-service-group metadata")
    ap.add_argument("--metadata", action="append", default=[], help="extra k=v metadata (repeatable)")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds")
    a = ap.parse_args()

    md = []
    if a.version:
        md.append(("tri-service-version", a.version))
    if a.group:
        md.append(("tri-service-group", a.group))
    for kv in a.metadata:
        k, sep, v = kv.partition("=")
        if not sep:
            ap.error("--metadata needs k=v")
        md.append((k.lower(), v))

    with grpc.insecure_channel(a.target) as ch:
        call = ch.unary_unary(f"/{a.interface}/{a.method}")  # no serializers: raw bytes both ways
        for _ in range(a.count):
            try:
                res = call(a.data.encode(), metadata=md or None, timeout=a.timeout)
                print(json.dumps({"ok": True, "value": res.decode("utf-8", "replace")}), flush=True)
            except grpc.RpcError as e:
                print(json.dumps({"ok": False, "error": f"{e.code().name}: {e.details()}",
                                  "code": e.code().value[0]}), flush=True)


if __name__ == "__main__":
    main()
