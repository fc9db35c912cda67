#!/usr/bin/env bash
# Download the official E2E NLG release (v1.0.0) for machines without ../shared/data/e2e.
#   bash scripts/get_data.sh [DEST]      # default DEST: data/e2e; then --config.data.dir=DEST
set -euo pipefail
DEST=${1:-data/e2e}
URL=https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip
SHA256=1261064c01907af27e8cc39e0a29a81541f6ab69208c1cbfc1be95afbb49dfac

mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -fL --retry 3 -o "$tmp/e2e.zip" "$URL"
echo "$SHA256  $tmp/e2e.zip" | sha256sum -c -
unzip -q -j "$tmp/e2e.zip" '*.csv' -d "$DEST"
ls "$DEST"
echo "E2E data in $DEST: pass --config.data.dir=$DEST"
