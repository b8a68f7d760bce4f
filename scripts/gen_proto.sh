#!/usr/bin/env bash
# Generate the protobuf/gRPC modules into cdp_common/pb from proto/cdp/v1, and the
# etcd v3 client stubs from proto/etcd (etcd's own API, vendored by
# scripts/vendor_etcd_proto.py; cdp_coordinator.etcdstore uses them).
# Generated code is not committed; bootstrap and `make proto` run this.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
out="$root/cdp_common/pb"
rm -rf "$out/cdp" "$out/etcd"
mkdir -p "$out"
"$py" -m grpc_tools.protoc -I "$root/proto" \
    --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
    "$root"/proto/cdp/v1/*.proto
# protoc emits absolute imports rooted at the proto path; make them package-relative.
sed -i 's/^from cdp\.v1 import/from cdp_common.pb.cdp.v1 import/' "$out"/cdp/v1/*.py "$out"/cdp/v1/*.pyi
touch "$out/cdp/__init__.py" "$out/cdp/v1/__init__.py"
"$py" -m grpc_tools.protoc -I "$root/proto" \
    --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
    "$root"/proto/etcd/*/*.proto
sed -i 's/^from etcd\.\([a-z]*pb\) import/from cdp_common.pb.etcd.\1 import/' \
    "$out"/etcd/*/*.py "$out"/etcd/*/*.pyi
touch "$out/etcd/__init__.py" "$out"/etcd/{authpb,mvccpb,etcdserverpb}/__init__.py
