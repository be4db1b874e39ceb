#!/usr/bin/env python3
"""Triple client built on PyPI apache-dubbo 3.0.0b1. Prints one JSON line per call. See README.md."""
import argparse
import json
import sys

import dubbo
from dubbo.configs import ReferenceConfig
from dubbo.protocol.triple import invoker as tri_invoker


def main():
    ap = argparse.ArgumentParser(description="Triple test client")
    ap.add_argument("--target", required=True, help="HOST:PORT")
    ap.add_argument("--interface", default="org.apache.dubbo.samples.HelloWorld")
    ap.add_argument("--method", default="unary")
    ap.add_argument("--data", required=True)
    ap.add_argument("--version", default=None)
    ap.add_argument("--group", default=None)
    ap.add_argument("--count", type=int, default=1)
    a = ap.parse_args()

    # The package never sets tri-service-version/-group (and would drop version "1.0.0"); add them ourselves.
    orig = tri_invoker.TripleInvoker._create_metadata

    def create_metadata(self, invocation):
        md = orig(self, invocation)
        if a.version:
            md.attachments["tri-service-version"] = a.version
        if a.group:
            md.attachments["tri-service-group"] = a.group
        return md

    tri_invoker.TripleInvoker._create_metadata = create_metadata

    def out(o):
        print(json.dumps(o), flush=True)

    try:
        client = dubbo.Client(ReferenceConfig.from_url(f"tri://{a.target}/{a.interface}"))
        stub = client.unary(a.method)
    except Exception as e:
        for _ in range(a.count):
            out({"ok": False, "error": f"{type(e).__name__}: {e}", "code": None})
        return
    for _ in range(a.count):
        try:
            res = stub(a.data.encode())
            out({"ok": True, "value": bytes(res).decode("utf-8", "replace")})
        except Exception as e:
            code = getattr(getattr(e, "status", None), "code", None)
            code = getattr(code, "value", code)
            if isinstance(code, tuple):
                code = code[0]
            out({"ok": False, "error": f"{type(e).__name__}: {e}", "code": code})


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    import os
    os._exit(0)  # the package's event-loop thread is not a daemon
