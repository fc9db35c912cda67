#!/usr/bin/env bash
# Download the official releases of E2E, SST-2 and DART into data/<task>, where the experiment
# configs find them without flags (configs.default_data_dir; search order in README "Data").
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash scripts/get_data.sh [--dest DIR] [--dry-run] [TASK...]

TASK: e2e, sst2, dart (default: all three). Each lands in DIR/<task> (default DIR: data/ in
the checkout), where the configs look without flags. With another DIR, export
PREFIX_JAX_DATA=DIR (or pass --config.data.dir=DIR/<task>).
  e2e   E2E NLG v1.0.0 (tuetschek/e2e-dataset release zip, sha256-checked):
        trainset.csv devset.csv testset.csv testset_w_refs.csv
  sst2  GLUE SST-2 (dl.fbaipublicfiles.com/glue/data/SST-2.zip; row counts checked):
        train.tsv dev.tsv test.tsv
  dart  DART v1.1.1 dev (JSON) and test (XML) from Yale-LILY/dart, pinned commit, sha256-checked
--dry-run prints what would be fetched and where, and writes nothing.
EOF
}

fail() { echo "error: $*" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST="$ROOT/data"
DRY=0
TASKS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --dest) [ $# -ge 2 ] || fail "--dest needs a directory: --dest DIR"; DEST=$2; shift ;;
    --dest=*) DEST=${1#--dest=} ;;
    e2e|sst2|dart) TASKS+=("$1") ;;
    *) fail "unknown argument '$1': give tasks among e2e, sst2, dart (see --help)" ;;
  esac
  shift
done
[ ${#TASKS[@]} -gt 0 ] || TASKS=(e2e sst2 dart)

E2E_URL=https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip
E2E_SHA256=1261064c01907af27e8cc39e0a29a81541f6ab69208c1cbfc1be95afbb49dfac
SST2_URL=https://dl.fbaipublicfiles.com/glue/data/SST-2.zip
DART_BASE=https://raw.githubusercontent.com/Yale-LILY/dart/bb644b12ec1d0264f96a31145534b9a94f6ff5f5/data/v1.1.1
DART_DEV_SHA256=56606eac12baa7f0ddb81c61890f9f1a95bace4df8f8989852786358fe5d2b88
DART_TEST_SHA256=4f6994d633030278798c114555549a13202780fe0d78ee2e7ac7dcce45a8e233

if [ "$DRY" = 1 ]; then
  for task in "${TASKS[@]}"; do
    case "$task" in
      e2e) echo "e2e: $E2E_URL -> $DEST/e2e" ;;
      sst2) echo "sst2: $SST2_URL -> $DEST/sst2" ;;
      dart) echo "dart: $DART_BASE/dart-v1.1.1-full-{dev.json,test.xml} -> $DEST/dart" ;;
    esac
  done
  exit 0
fi

for tool in curl unzip sha256sum; do
  command -v "$tool" >/dev/null || fail "$tool is not installed; install it and rerun"
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fetch() {  # URL FILE [SHA256]
  curl -fL --retry 3 -o "$2" "$1"
  if [ -n "${3:-}" ]; then echo "$3  $2" | sha256sum -c --quiet - ; fi
}

rows() { echo $(( $(wc -l < "$1") - 1 )); }  # data rows of a file with a header

for task in "${TASKS[@]}"; do
  out="$DEST/$task"
  mkdir -p "$out"
  case "$task" in
    e2e)
      fetch "$E2E_URL" "$tmp/e2e.zip" "$E2E_SHA256"
      unzip -q -o -j "$tmp/e2e.zip" '*.csv' -d "$out" ;;
    sst2)
      fetch "$SST2_URL" "$tmp/sst2.zip"
      unzip -q -o -j "$tmp/sst2.zip" 'SST-2/*.tsv' -d "$out"
      # no published checksum for GLUE's zip: check that it is the GLUE split sizes
      [ "$(rows "$out/train.tsv")" = 67349 ] && [ "$(rows "$out/dev.tsv")" = 872 ] \
        || fail "$out: train/dev row counts are not GLUE SST-2's (67349/872); remove it and rerun" ;;
    dart)
      fetch "$DART_BASE/dart-v1.1.1-full-dev.json" "$out/dart-v1.1.1-full-dev.json" "$DART_DEV_SHA256"
      fetch "$DART_BASE/dart-v1.1.1-full-test.xml" "$out/dart-v1.1.1-full-test.xml" "$DART_TEST_SHA256" ;;
  esac
  echo "$task: $(ls "$out" | tr '\n' ' ')in $out"
done
if [ "$DEST" != "$ROOT/data" ]; then
  echo "the configs find these with: export PREFIX_JAX_DATA=$DEST"
fi
