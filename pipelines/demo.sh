#!/usr/bin/env bash
# The demo behind `make demo`, offline, in about a minute:
#   1. CAT caption filters over 1,000 bundled real LAION captions;
#   2. the image pipeline over 34 bundled pairs: caption filters -> download with img2dataset
#      (file: URLs, no server) -> text spotting, then `curate select` into webdataset shards.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1

echo "== 1. caption filters over 1,000 LAION captions"
out=runs/demo
rm -rf "$out"
curate run pipelines/demo.yaml --output "$out" --no-progress
curate stats "$out"
curate query "$out" "SELECT caption, caption_complexity, caption_actions FROM samples WHERE keep LIMIT 5"

echo
echo "== 2. images: caption filters -> download (img2dataset) -> text spotting -> select"
out=runs/demo_images
subset=runs/demo_subset
rm -rf "$out" "$subset"
curate run pipelines/demo_images.yaml --output "$out" --no-progress
curate stats "$out"
curate query "$out" "SELECT coalesce(drop_reason, 'kept') AS outcome, status, count(*) AS pairs
                     FROM samples GROUP BY ALL ORDER BY pairs DESC"
curate select "$out" --out "$subset"
cat "$subset/sizes.json"
echo "first samples of $subset/00000.tar:"
tar -tvf "$subset/00000.tar" | sed -n 1,6p   # sed, not head: no SIGPIPE under pipefail
