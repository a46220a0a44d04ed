#!/usr/bin/env bash
# The contract stays compatible: `buf breaking` compares protos/ with the previous commit's, under
# the rules protos/buf.yaml names (WIRE_JSON: the wire format and TIW's JSON names). Skipped, with
# a message, where there is nothing to compare with: a clone with no parent commit (the first
# commit, or a shallow clone of depth 1) or a parent without protos/.
# Against another base: BASE=origin/main bash scripts/check_protos.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/node_modules/.bin:$PATH"

base=${BASE:-HEAD~1}
if ! git rev-parse --verify --quiet "$base^{commit}" >/dev/null; then
  echo "check_protos: no commit $base to compare with (first commit or shallow clone): skipped"
  exit 0
fi
if ! git cat-file -e "$base:protos/buf.yaml" 2>/dev/null; then
  echo "check_protos: $base has no protos/buf.yaml: nothing to compare with, skipped"
  exit 0
fi
buf breaking protos --against ".git#subdir=protos,ref=$(git rev-parse "$base")"
echo "check_protos: protos/ is compatible with $base ($(git rev-parse --short "$base"))"
