#!/usr/bin/env bash
# Lints the proto with buf (rules in buf.yaml: STANDARD + COMMENTS, one documented exception)
# and checks it is formatted as `buf format` would write it.
# Installs the pinned buf from npm (@bufbuild/buf ships the binary) into a temp dir, removed on exit.
# Needs node and npm. Set BUF to use a buf binary you already have instead.
set -euo pipefail

BUF_VERSION="1.75.0"
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

tmp=""
cleanup() { [[ -z "$tmp" ]] || rm -rf "$tmp"; }
trap cleanup EXIT

if [[ -n "${BUF:-}" ]]; then
  buf="$BUF"
else
  command -v npm >/dev/null || { echo "buf-lint: npm not found (Node 20 with npm is needed)" >&2; exit 1; }
  tmp="$(mktemp -d "${TMPDIR:-/tmp}/buf-lint.XXXXXX")"
  echo "== installing @bufbuild/buf@$BUF_VERSION into $tmp" >&2
  npm install --prefix "$tmp" --no-save --no-audit --no-fund --loglevel=error "@bufbuild/buf@$BUF_VERSION" >&2
  buf="$tmp/node_modules/.bin/buf"
fi

echo "== buf $("$buf" --version) lint"
"$buf" lint
echo "== buf format --diff --exit-code"
"$buf" format --diff --exit-code
echo "buf-lint: proto/ passes buf lint and is formatted"
