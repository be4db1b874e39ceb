#!/usr/bin/env python3
"""A client of Pilot's registry gRPC API (tessera.registry.v1.Registry) written only with code
we did not write: protoc from grpcio-tools compiles the proto in
crates/tessera-pilot/proto/tessera/registry/v1/registry.proto into Python stubs, and grpcio
calls the server with them.

  registry_grpc.py watch ADDR NAMESPACE SINCE
      One line of JSON per WatchResponse; at the stream's end {"end": CODE, "details": TEXT}.
  registry_grpc.py session ADDR
      Each stdin line, an Instance as JSON, is sent as a SessionRequest; one line per response
      ({"revision": N}); stdin's end half-closes the stream; then {"end": CODE, "details": TEXT}.
"""

import atexit
import json
import os
import shutil
import sys
import tempfile

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.normpath(os.path.join(HERE, "../../../tessera-pilot/proto"))


def stubs():
    out = tempfile.mkdtemp(prefix="registry-stubs-")
    atexit.register(shutil.rmtree, out, True)
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "tessera/registry/v1/registry.proto",
        ]
    )
    if rc != 0:
        sys.exit(f"protoc failed on {PROTO_ROOT}: {rc}")
    sys.path.insert(0, out)
    from tessera.registry.v1 import registry_pb2, registry_pb2_grpc  # noqa: E402

    return registry_pb2, registry_pb2_grpc


pb, pb_grpc = stubs()


def say(obj):
    print(json.dumps(obj, sort_keys=True), flush=True)


def event(e):
    d = {"type": pb.Event.Type.Name(e.type), "revision": e.revision}
    if e.HasField("instance"):
        i = e.instance
        d.update(
            kind="instance",
            namespace=i.namespace,
            service=i.service,
            id=i.id,
            address=i.address,
            ports=dict(i.ports),
            labels=dict(i.labels),
            weight=i.weight,
            healthy=i.healthy if i.HasField("healthy") else None,
            source=i.source,
        )
    elif e.HasField("service"):
        s = e.service
        d.update(
            kind="service",
            namespace=s.namespace,
            name=s.name,
            ports=[{"name": p.name, "port": p.port, "protocol": p.protocol} for p in s.ports],
            source=s.source,
        )
    return d


def ended(err):
    say({"end": err.code().name, "details": err.details()})


def watch(addr, namespace, since):
    with grpc.insecure_channel(addr) as ch:
        stub = pb_grpc.RegistryStub(ch)
        try:
            for r in stub.Watch(pb.WatchRequest(namespace=namespace, since_revision=int(since))):
                say(
                    {
                        "revision": r.revision,
                        "initial": r.initial,
                        "synced": r.synced,
                        "events": [event(e) for e in r.events],
                    }
                )
            say({"end": "OK", "details": ""})
        except grpc.RpcError as err:
            ended(err)


def instance(d):
    i = pb.Instance(
        namespace=d.get("namespace", ""),
        service=d.get("service", ""),
        id=d.get("id", ""),
        address=d.get("address", ""),
        port=d.get("port", 0),
        weight=d.get("weight", 0),
        locality=d.get("locality", ""),
    )
    i.ports.update(d.get("ports", {}))
    i.labels.update(d.get("labels", {}))
    if "healthy" in d:
        i.healthy = d["healthy"]
    return i


def session(addr):
    def requests():
        for line in sys.stdin:
            line = line.strip()
            if line:
                yield pb.SessionRequest(instance=instance(json.loads(line)))

    with grpc.insecure_channel(addr) as ch:
        stub = pb_grpc.RegistryStub(ch)
        try:
            for r in stub.Session(requests()):
                say({"revision": r.revision})
            say({"end": "OK", "details": ""})
        except grpc.RpcError as err:
            ended(err)


if __name__ == "__main__":
    if sys.argv[1] == "watch":
        watch(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "session":
        session(sys.argv[2])
    else:
        sys.exit(f"unknown command {sys.argv[1]}")
