#!/usr/bin/env python3
"""Copy etcd's v3 API protos into proto/etcd/, stripped to what protoc needs here.

Usage: scripts/vendor_etcd_proto.py ETCD_CHECKOUT [TAG]   (TAG default v3.4.23, Debian's)

Removed, and nothing else: the gogoproto import and options (Go code generation
only) and the grpc-gateway `google.api.http` options with their import (the
HTTP/JSON gateway, which cdp does not use). Import paths are rewritten to
proto/etcd/. The wire format and service names (`etcdserverpb.KV`, ...) are
untouched, so the generated stubs talk to any etcd 3.x.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

FILES = {  # path in etcd at TAG -> path under proto/
    "etcdserver/etcdserverpb/rpc.proto": "etcd/etcdserverpb/rpc.proto",
    "mvcc/mvccpb/kv.proto": "etcd/mvccpb/kv.proto",
    "auth/authpb/auth.proto": "etcd/authpb/auth.proto",
}

HEADER = """\
// Copyright The etcd Authors. Licensed under the Apache License, Version 2.0
// (proto/etcd/LICENSE). From etcd {tag}, {src}.
// Copied by scripts/vendor_etcd_proto.py: gogoproto and grpc-gateway (google.api.http)
// options removed, imports rewritten to proto/etcd/; messages, fields and services
// are etcd's own.
"""


def strip(text: str) -> str:
    text = re.sub(r'^import "(gogoproto/gogo|google/api/annotations)\.proto";\n', "", text,
                  flags=re.M)
    text = re.sub(r"^// for grpc-gateway\n", "", text, flags=re.M)
    text = re.sub(r"^option \(gogoproto\.[a-z_]+\) = \w+;\n", "", text, flags=re.M)
    # rpc X(A) returns (B) { option (google.api.http) = { ... }; }  ->  rpc X(A) returns (B) {}
    # (one level of nesting: `additional_bindings { ... }`)
    text = re.sub(r"\{\s*option \(google\.api\.http\) = \{(?:[^{}]|\{[^{}]*\})*\};\s*\}", "{}",
                  text)
    text = re.sub(r"\s*\[\(gogoproto\.[^\]]*\]", "", text)   # field options
    text = text.replace('import "etcd/mvcc/mvccpb/kv.proto";', 'import "etcd/mvccpb/kv.proto";')
    text = text.replace('import "etcd/auth/authpb/auth.proto";',
                        'import "etcd/authpb/auth.proto";')
    if "gogoproto" in text or "google.api" in text:
        raise SystemExit("vendor_etcd_proto: an option was left; extend strip()")
    return re.sub(r"\n{3,}", "\n\n", text)


def main() -> None:
    checkout = sys.argv[1]
    tag = sys.argv[2] if len(sys.argv) > 2 else "v3.4.23"
    out = Path(__file__).resolve().parent.parent / "proto"
    for src, dst in FILES.items():
        text = subprocess.run(["git", "-C", checkout, "show", f"{tag}:{src}"], check=True,
                              capture_output=True, text=True).stdout
        path = out / dst
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(HEADER.format(tag=tag, src=src) + strip(text))
    license_text = subprocess.run(["git", "-C", checkout, "show", f"{tag}:LICENSE"], check=True,
                                  capture_output=True, text=True).stdout
    (out / "etcd" / "LICENSE").write_text(license_text)


if __name__ == "__main__":
    main()
