#!/usr/bin/env bash
# The demo behind `make demo`, offline, in a few minutes on 2 CPU cores (it writes only under
# runs/make_demo/, so the runs the README has you make by hand are never touched):
#   1. CAT caption filters over 1,000 bundled real LAION captions;
#   2. the image pipeline over 34 bundled pairs: caption filters -> download with img2dataset
#      (file: URLs, no server) -> text spotting, then `curate select` into webdataset shards.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1

echo "== 1. caption filters over 1,000 LAION captions"
out=runs/make_demo/captions
rm -rf "$out"
curate run pipelines/demo.yaml --output "$out" --no-progress
curate stats "$out"
curate query "$out" "SELECT caption, caption_complexity, caption_actions FROM samples WHERE keep LIMIT 5"

echo
echo "== 2. images: caption filters -> download (img2dataset) -> text spotting -> select"
out=runs/make_demo/images
subset=runs/make_demo/subset
rm -rf "$out" "$subset"
curate run pipelines/demo_images.yaml --output "$out" --no-progress
curate stats "$out"
curate query "$out" "SELECT coalesce(drop_reason, 'kept') AS outcome, status, count(*) AS pairs
                     FROM samples GROUP BY ALL ORDER BY pairs DESC"
curate select "$out" --out "$subset"
cat "$subset/sizes.json"
echo "first samples of $subset/00000.tar:"
tar -tvf "$subset/00000.tar" | sed -n 1,6p   # sed, not head: no SIGPIPE under pipefail
