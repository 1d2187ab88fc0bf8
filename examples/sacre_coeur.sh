#!/usr/bin/env bash
# Reconstruct the 10 Sacre Coeur photos: asmkit pairs (every pair, verified with a
# fundamental matrix) writes a COLMAP database, pycolmap's incremental mapper reads it
# without matching again. Needs the [sfm] extra (pycolmap).
#
#   bash examples/sacre_coeur.sh [IMAGES] [OUT]
set -euo pipefail
images=${1:-../shared/datasets/sacre_coeur/images}
out=${2:-sacre_coeur_sfm}
mkdir -p "$out"
asmkit pairs "$images" --out "$out/pairs.txt" --graph complete --verify --min-inliers 15 \
    --config "$(dirname "$0")/sacre_coeur.toml" \
    --colmap-db "$out/database.db" --cache "$out/cache"
python - "$out/database.db" "$images" "$out/models" <<'PY'
import sys

from asmkit.colmap import reconstruct

result = reconstruct(*sys.argv[1:])
print(f"registered {result['registered']} images, {result['points']} points ({result['models']} model(s))")
for name in result["registered_images"]:
    print("  ", name)
PY
