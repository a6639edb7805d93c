#!/usr/bin/env bash
# Generates the Python stubs for channelgateway.v1 from ../../proto into ./generated
# (grpcio-tools; run `pip install -r requirements.txt` first). Safe to run again: it starts clean.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
proto_root="$here/../../proto"
out="$here/generated"
python="${PYTHON:-python3}"

if ! "$python" -c 'import grpc_tools.protoc' 2>/dev/null; then
  echo "build.sh: grpcio-tools is not installed for $python; run: $python -m pip install -r $here/requirements.txt" >&2
  exit 1
fi

rm -rf "$out"
mkdir -p "$out"
# grpc_tools.protoc adds the well-known types (google/protobuf/*.proto) to the include path itself.
"$python" -m grpc_tools.protoc \
  --proto_path="$proto_root" \
  --python_out="$out" \
  --pyi_out="$out" \
  --grpc_python_out="$out" \
  channelgateway/v1/gateway.proto
echo "build.sh: stubs generated in $out"
