#!/usr/bin/env bash
# The demo behind `make demo`: CAT caption filters over 1,000 bundled real LAION captions.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
out=runs/demo
rm -rf "$out"
curate run pipelines/demo.yaml --output "$out"
curate stats "$out"
curate query "$out" "SELECT caption, caption_complexity, caption_actions FROM samples WHERE keep LIMIT 5"
