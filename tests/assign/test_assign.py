"""Context assignment on real files: label COGs in UTM, polygons in WGS84."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyogrio.raw
import pytest
import rasterio
import rasterio.features
import rasterio.warp
import shapely
import yaml
from affine import Affine
from rasterio.crs import CRS

from sitfuse_byol.assign import (
    UNCERTAIN,
    CountTable,
    build_mapping,
    count_cluster_classes,
    format_class_table,
    load_mapping,
    read_class_polygons,
    run_assign,
    write_mapping,
)
from sitfuse_byol.assign.polygons import burn_windows
from sitfuse_byol.errors import ConfigError, InputError
from sitfuse_byol.export.label_raster import write_label_raster
from sitfuse_byol.export.sidecars import qml_path_for
from sitfuse_byol.grid import Grid

UTM18N = CRS.from_epsg(32618)
K = 6
H, W = 40, 60
GRIDS = {
    "a": Grid(H, W, Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 4_500_000.0), UTM18N),
    # 1 km east of scene a, with a gap between them.
    "b": Grid(H, W, Affine(10.0, 0.0, 501_600.0, 0.0, -10.0, 4_500_000.0), UTM18N),
}


def scene_labels(scene: str) -> np.ndarray:
    """Clusters 0..5 as vertical stripes 10 pixels wide, plus a nodata strip.

    Scene a: cluster = col // 10, rows 35.. nodata. Scene b: cluster = 5 - col // 10,
    rows ..4 nodata.
    """
    cols = np.broadcast_to(np.arange(W) // 10, (H, W))
    if scene == "a":
        labels = cols.astype(np.uint8)
        labels[35:] = 255
    else:
        labels = (5 - cols).astype(np.uint8)
        labels[:5] = 255
    return labels


# (scene, (row0, row1), (col0, col1), class), in feature order. Rows and columns are
# pixel edges, so the reprojection round trip cannot move a pixel centre across them.
FEATURES = [
    ("a", (0, 20), (0, 10), "water"),
    ("a", (0, 20), (10, 20), "forest"),
    ("a", (0, 10), (20, 25), "water"),
    ("a", (0, 10), (25, 30), "forest"),
    ("a", (20, 30), (30, 40), "forest"),
    ("b", (10, 12), (20, 25), "water"),
    ("a", (30, 40), (50, 60), "water"),  # half of it over nodata
    ("a", (29, 30), (50, 51), "water"),
    ("b", (5, 12), (0, 7), "forest"),
    ("a", (15, 25), (0, 5), "forest"),  # overlaps the first feature and, drawn later, wins
    ("b", (30, 50), (55, 60), "water"),  # runs past the scene's bottom edge
]
# Cluster rows, class columns [forest, water], worked out by hand from the layout above.
EXPECTED_COUNTS = np.array([[50, 225], [200, 0], [50, 50], [100, 10], [0, 0], [49, 51]])
EXPECTED_MAPPING = ["water", "forest", UNCERTAIN, "forest", UNCERTAIN, "water"]


def utm_box(scene: str, rows: tuple[int, int], cols: tuple[int, int]) -> shapely.Polygon:
    t = GRIDS[scene].transform
    (x0, y0), (x1, y1) = t * (cols[0], rows[0]), t * (cols[1], rows[1])
    return shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def to_wgs84(polygon: shapely.Polygon) -> shapely.Polygon:
    xs, ys = polygon.exterior.coords.xy
    lons, lats = rasterio.warp.transform(UTM18N, "EPSG:4326", list(xs), list(ys))
    return shapely.Polygon(zip(lons, lats, strict=True))


def feature_geometries(features: list[tuple]) -> list[shapely.Polygon]:
    return [to_wgs84(utm_box(scene, rows, cols)) for scene, rows, cols, _ in features]


def write_vector(
    path: Path,
    geometries: list[shapely.Geometry],
    fields: dict[str, list],
    *,
    crs: str | None = "EPSG:4326",
    geometry_type: str = "Polygon",
) -> Path:
    driver = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".shp": "ESRI Shapefile"}[path.suffix]
    pyogrio.raw.write(
        path,
        geometry=shapely.to_wkb(np.array(geometries, dtype=object)),
        # Text (with None for empty) as object arrays, numbers in their own dtype.
        field_data=[
            np.array(v, dtype=object if any(not isinstance(x, int) for x in v) else np.int64)
            for v in fields.values()
        ],
        fields=list(fields),
        driver=driver,
        geometry_type=geometry_type,
        crs=crs,
    )
    return path


def write_class_polygons(path: Path, features: list[tuple] = FEATURES) -> Path:
    return write_vector(path, feature_geometries(features), {"class": [f[3] for f in features]})


def painted_counts(features: list[tuple]) -> np.ndarray:
    """The count table computed with numpy slicing alone, painting features in order."""
    classes = sorted({f[3] for f in features})
    counts = np.zeros((K, len(classes)), dtype=np.int64)
    for scene in GRIDS:
        painted = np.full((H, W), -1)
        for where, rows, cols, name in features:
            if where == scene:
                painted[rows[0] : rows[1], cols[0] : cols[1]] = classes.index(name)
        labels = scene_labels(scene)
        inside = (painted >= 0) & (labels != 255)
        np.add.at(counts, (labels[inside], painted[inside]), 1)
    return counts


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run's output directory holding labels/a.tif and labels/b.tif."""
    out = tmp_path_factory.mktemp("run")
    for scene, grid in GRIDS.items():
        write_label_raster(
            scene_labels(scene),
            grid=grid,
            path=out / "labels" / f"{scene}.tif",
            n_labels=K,
            overview_levels=[],
        )
    return out


@pytest.fixture(scope="module")
def label_paths(run_dir: Path) -> list[Path]:
    return [run_dir / "labels" / "a.tif", run_dir / "labels" / "b.tif"]


def read_band(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(1), src.profile


# --- counting and mapping -------------------------------------------------------------


def test_hand_worked_counts_are_the_numpy_painting() -> None:
    # The test data's own check, once: the tests below compare against EXPECTED_COUNTS.
    np.testing.assert_array_equal(painted_counts(FEATURES), EXPECTED_COUNTS)


@pytest.mark.parametrize(
    ("suffix", "crs"), [(".gpkg", "EPSG:4326"), (".geojson", "EPSG:4326"), (".gpkg", "EPSG:32618")]
)
def test_counts_over_two_scenes_match_numpy_and_give_the_expected_mapping(
    tmp_path: Path, label_paths: list[Path], suffix: str, crs: str
) -> None:
    far_away = ("a", (-2000, -1990), (-2000, -1990), "water")  # 20 km off, in no scene
    features = [*FEATURES, far_away]
    if crs == "EPSG:4326":
        geometries = feature_geometries(features)
    else:
        geometries = [utm_box(scene, rows, cols) for scene, rows, cols, _ in features]
    path = write_vector(
        tmp_path / f"classes{suffix}", geometries, {"class": [f[3] for f in features]}, crs=crs
    )

    polygons = read_class_polygons(path, field="class")
    assert polygons.crs == crs
    assert polygons.class_names == ["forest", "water"]
    counts = count_cluster_classes(label_paths, polygons)

    np.testing.assert_array_equal(counts.counts, EXPECTED_COUNTS)
    assert counts.counts.dtype == np.int64
    assert counts.scenes == ["a", "b"]
    assert counts.outside == [len(FEATURES)]  # the far-away one
    mapping = build_mapping(counts, threshold=0.51)
    assert mapping.clusters == EXPECTED_MAPPING
    assert mapping.output_classes == ["forest", "water", UNCERTAIN]
    np.testing.assert_allclose(mapping.purity()[[0, 2, 5]], [225 / 275, 0.5, 0.51])
    assert np.isnan(mapping.purity()[4])


def test_threshold_decides_at_the_boundary_and_ties_are_uncertain(tmp_path: Path) -> None:
    counts = CountTable(
        counts=EXPECTED_COUNTS.astype(np.int64),
        class_names=["forest", "water"],
        polygons_path=tmp_path / "p.gpkg",
        scenes=["a"],
    )
    # Cluster 5 is 51 % water: in at 0.51, out at 0.52; cluster 2's 50/50 tie stays
    # uncertain even when 0.5 would let either class win.
    assert build_mapping(counts, threshold=0.51).clusters[5] == "water"
    assert build_mapping(counts, threshold=0.52).clusters[5] == UNCERTAIN
    assert build_mapping(counts, threshold=0.5).clusters[2] == UNCERTAIN
    assert build_mapping(counts, threshold=1.0).clusters == [UNCERTAIN, "forest", *[UNCERTAIN] * 4]
    for bad in (0.0, -0.1, 1.5, float("nan"), True):
        with pytest.raises(ConfigError, match="threshold"):
            build_mapping(counts, threshold=bad)


def test_run_assign_writes_class_rasters_on_the_label_grids(
    tmp_path: Path, label_paths: list[Path]
) -> None:
    polygons = write_class_polygons(tmp_path / "classes.gpkg")
    out = tmp_path / "out"

    result = run_assign(
        label_paths=label_paths, polygons_path=polygons, field="class", threshold=0.51, out_dir=out
    )

    assert result.mapping_path == out / "assign" / "mapping.yaml"
    assert result.class_paths == [out / "classes" / "a.tif", out / "classes" / "b.tif"]
    lut = np.array([1, 0, 2, 0, 2, 1])  # forest 0, water 1, uncertain 2, by EXPECTED_MAPPING
    for label_path, class_path in zip(label_paths, result.class_paths, strict=True):
        labels, label_profile = read_band(label_path)
        classes, profile = read_band(class_path)
        assert profile["crs"] == label_profile["crs"]
        assert profile["transform"] == label_profile["transform"]
        assert (profile["dtype"], profile["nodata"]) == ("uint8", 255)
        expected = np.where(labels == 255, 255, lut[np.minimum(labels, K - 1)])
        np.testing.assert_array_equal(classes, expected)
        with rasterio.open(class_path) as src:
            assert src.descriptions == ("class",)
            assert src.tags()["K"] == "3"
        entries = ET.parse(qml_path_for(class_path)).getroot().iter("paletteEntry")
        assert [(e.get("value"), e.get("label")) for e in entries] == [
            ("0", "forest"),
            ("1", "water"),
            ("2", UNCERTAIN),
        ]

    # forest: clusters 1 and 3, 310 px in polygons, 300 of them forest, of 449 forest px.
    # water: clusters 0 and 5, 375 px, 276 water, of 336 water px.
    lines = {line.split()[0]: line.split() for line in result.table.splitlines()[1:4]}
    assert lines["forest"] == ["forest", "2", "1,", "3", "310", "96.8%", "66.8%"]
    assert lines["water"] == ["water", "2", "0,", "5", "375", "73.6%", "82.1%"]
    assert lines[UNCERTAIN] == [UNCERTAIN, "2", "2,", "4", "100", "-", "-"]
    assert result.table.splitlines()[-1] == "4 of 6 clusters mapped to a class, 2 uncertain"


def test_mapping_yaml_round_trips_and_an_edit_is_re_applied(
    tmp_path: Path, label_paths: list[Path]
) -> None:
    polygons = write_class_polygons(tmp_path / "classes.geojson")
    out = tmp_path / "out"
    first = run_assign(
        label_paths=label_paths, polygons_path=polygons, field="class", threshold=0.51, out_dir=out
    )
    text = written = first.mapping_path.read_text()
    # The re-apply command in the header works from any folder.
    assert f"#     sitfuse assign -c CONFIG --apply {first.mapping_path.resolve()}\n" in text
    assert re.search(r"^  0: water +# 275 px in polygons, 81.8% water$", text, re.M)
    assert re.search(r"^  2: uncertain +# 100 px, 50% forest / 50% water$", text, re.M)
    assert re.search(r"^  4: uncertain +# no pixels in polygons$", text, re.M)
    assert yaml.safe_load(text)["classes"] == ["forest", "water", UNCERTAIN]
    loaded = load_mapping(first.mapping_path, n_labels=K)
    assert loaded.clusters == EXPECTED_MAPPING
    assert loaded.classes == ["forest", "water"]
    assert loaded.threshold == 0.51

    # The user decides cluster 2 is forest and cluster 0 is not worth keeping.
    text_before_edit = first.mapping_path.read_text()
    edited = tmp_path / "edited.yaml"
    text = re.sub(r"^  2: uncertain", "  2: forest", text, flags=re.M)
    edited.write_text(re.sub(r"^  0: water.*\n", "", text, flags=re.M))
    again = run_assign(
        label_paths=label_paths,
        polygons_path=None,
        field="class",
        threshold=0.51,
        out_dir=out,
        apply=edited,
    )

    assert again.counts is None
    # The applied file becomes the run's mapping, the one the class rasters come from.
    assert again.mapping_path == out / "assign" / "mapping.yaml"
    assert again.mapping_path.read_text() == edited.read_text()
    # What it replaced, a count, is kept: only the polygons could make its counts again.
    assert written == text_before_edit
    assert (out / "assign" / "mapping.previous.yaml").read_text() == text_before_edit
    assert f"kept the earlier mapping as {out / 'assign' / 'mapping.previous.yaml'}" in again.notes
    (out / "assign" / "mapping.previous.yaml").unlink()  # the checks below start without it
    assert again.mapping.clusters == [UNCERTAIN, "forest", "forest", "forest", UNCERTAIN, "water"]
    assert any("clusters 0 are not in edited.yaml" in n for n in again.notes)
    labels, _ = read_band(label_paths[0])
    classes, _ = read_band(again.class_paths[0])
    np.testing.assert_array_equal(classes[labels == 2], 0)
    np.testing.assert_array_equal(classes[labels == 0], 2)
    np.testing.assert_array_equal(classes[labels == 5], 1)
    assert "-" in again.table.splitlines()[1].split()
    # Judged against the first run's counts, forest now also holds cluster 2's 50/50 pixels.
    forest = format_class_table(first.counts, again.mapping).splitlines()[1].split()
    assert forest == ["forest", "3", "1-3", "410", "85.4%", "78%"]

    # Counting again keeps the earlier (possibly edited) file instead of overwriting it.
    first.mapping_path.write_text(edited.read_text())
    run_assign(
        label_paths=label_paths, polygons_path=polygons, field="class", threshold=0.6, out_dir=out
    )
    assert (out / "assign" / "mapping.previous.yaml").read_text() == edited.read_text()
    assert load_mapping(first.mapping_path, n_labels=K).threshold == 0.6
    # The same count once more: the edit kept aside is not overwritten by a copy of the mapping.
    again = run_assign(
        label_paths=label_paths, polygons_path=polygons, field="class", threshold=0.6, out_dir=out
    )
    assert not any("kept the earlier mapping" in note for note in again.notes)
    assert (out / "assign" / "mapping.previous.yaml").read_text() == edited.read_text()
    # Another threshold replaces the untouched 0.6 count; the edit stays kept aside.
    again = run_assign(
        label_paths=label_paths, polygons_path=polygons, field="class", threshold=0.7, out_dir=out
    )
    assert not any("kept the earlier mapping" in note for note in again.notes)
    assert (out / "assign" / "mapping.previous.yaml").read_text() == edited.read_text()
    # A second edit does not overwrite the first.
    second = re.sub(r"^  1: \S+", "  1: water", first.mapping_path.read_text(), flags=re.M)
    first.mapping_path.write_text(second)
    again = run_assign(
        label_paths=label_paths, polygons_path=polygons, field="class", threshold=0.6, out_dir=out
    )
    assert f"kept the earlier mapping as {out / 'assign' / 'mapping.previous.2.yaml'}" in again.notes
    assert (out / "assign" / "mapping.previous.yaml").read_text() == edited.read_text()
    assert (out / "assign" / "mapping.previous.2.yaml").read_text() == second


def test_written_yaml_quotes_class_names_yaml_would_misread(tmp_path: Path) -> None:
    counts = CountTable(
        counts=np.array([[9, 0, 0], [0, 9, 0], [0, 0, 9]], dtype=np.int64),
        class_names=["1", "no", "sea: deep"],
        polygons_path=tmp_path / "p.gpkg",
        scenes=["a"],
    )
    mapping = build_mapping(counts)
    path = write_mapping(tmp_path / "m.yaml", mapping)
    assert load_mapping(path, n_labels=3).clusters == ["1", "no", "sea: deep"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("  5: water", "  9: water"),
            "unknown cluster id 9; the label rasters have clusters 0..5",
        ),
        (("  5: water", "  5: yes"), "cluster 5: the class must be a name, got True"),
        (
            ("  5: water", "  5: watr"),
            "class 'watr' is not listed in 'classes'.*did you mean 'water'",
        ),
        (("  5: water", "  1: water"), "key 1 appears twice"),
        (("n_labels: 6", "n_labels: 7"), "mapping is for 7 clusters, but the label rasters have 6"),
        (("threshold: 0.51", "threshold: 2"), "threshold must be in"),
        (("clusters:", "clusterz:"), "unknown key"),
        (("classes: [", "classes: [["), "not valid YAML: .* at line \\d+ \\("),
    ],
)
def test_load_mapping_rejects_bad_edits_clearly(
    tmp_path: Path, edit: tuple[str, str], message: str
) -> None:
    counts = CountTable(EXPECTED_COUNTS.astype(np.int64), ["forest", "water"], tmp_path, ["a"])
    path = write_mapping(tmp_path / "mapping.yaml", build_mapping(counts))
    text = path.read_text()
    assert edit[0] in text
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError, match=message) as info:
        load_mapping(path, n_labels=K)
    assert str(path) in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_renaming_a_class_in_the_mapping_keeps_every_class_value(tmp_path: Path) -> None:
    counts = CountTable(EXPECTED_COUNTS.astype(np.int64), ["forest", "water"], tmp_path, ["a"])
    path = write_mapping(tmp_path / "mapping.yaml", build_mapping(counts))
    assert load_mapping(path, n_labels=K).classes == ["forest", "water"]
    path.write_text(path.read_text().replace("forest", "woods"))
    renamed = load_mapping(path, n_labels=K)
    # "woods" sorts after "water", but keeps forest's place (value 0) from the file's list.
    assert renamed.classes == ["woods", "water"]
    assert renamed.clusters == [c.replace("forest", "woods") for c in EXPECTED_MAPPING]


def test_a_mapping_file_that_is_not_utf8_text(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_bytes(b"clusters:\n  0: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_mapping(path, n_labels=3)
    assert str(info.value) == f"mapping file is not UTF-8 text ({path})"


def test_load_mapping_accepts_quoted_ids_and_names(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("clusters:\n  '0': '3'\n  1: water\n")
    mapping = load_mapping(path, n_labels=3)
    assert mapping.clusters == ["3", "water", UNCERTAIN]
    assert mapping.output_classes == ["3", "water", UNCERTAIN]
    assert mapping.threshold is None
    assert mapping.notes == ["clusters 2 are not in m.yaml; they count as uncertain"]


# --- errors a user can cause ----------------------------------------------------------


def test_polygons_that_overlap_no_scene(tmp_path: Path, label_paths: list[Path]) -> None:
    elsewhere = [("a", (-2000, -1990), (-2000, -1990), "water")]
    path = write_class_polygons(tmp_path / "far.gpkg", elsewhere)
    with pytest.raises(InputError) as info:
        count_cluster_classes(label_paths, read_class_polygons(path, field="class"))
    assert info.value.what == "no polygon overlaps any scene; check the polygons' CRS and extent"
    assert info.value.where == str(path)


def test_polygons_in_a_scene_that_count_no_pixel_say_why(tmp_path: Path, label_paths: list[Path]) -> None:
    # Inside pixel (row 5, col 5) of scene a, away from its centre (500055, 4499945).
    sliver = to_wgs84(shapely.box(500_050.5, 4_499_941.0, 500_053.0, 4_499_943.0))
    path = write_vector(tmp_path / "sliver.gpkg", [sliver], {"class": ["water"]})
    with pytest.raises(InputError) as info:
        count_cluster_classes(label_paths, read_class_polygons(path, field="class"))
    assert info.value.what == "no polygon holds a pixel centre of a scene; draw them larger than a pixel"
    # Rows 35.. of scene a are nodata.
    path = write_class_polygons(tmp_path / "nodata.gpkg", [("a", (36, 40), (0, 10), "water")])
    with pytest.raises(InputError) as info:
        count_cluster_classes(label_paths, read_class_polygons(path, field="class"))
    assert info.value.what == "the polygons cover only nodata pixels of the scenes"


def test_missing_field_lists_the_fields(tmp_path: Path) -> None:
    path = write_vector(
        tmp_path / "p.gpkg", feature_geometries(FEATURES[:2]), {"name": ["w", "f"], "id": [1, 2]}
    )
    with pytest.raises(InputError) as info:
        read_class_polygons(path, field="class")
    assert str(info.value) == (
        f"no field 'class' in polygons; fields are: name, id (did you mean 'name'?) ({path})"
    )
    # OGR matches field names regardless of case, and so do we.
    assert read_class_polygons(path, field="NAME").classes == ["w", "f"]


def test_polygon_file_without_crs(tmp_path: Path) -> None:
    geometries = [utm_box(s, r, c) for s, r, c, _ in FEATURES[:2]]
    with pytest.warns(UserWarning, match="'crs' was not provided"):
        path = write_vector(tmp_path / "p.shp", geometries, {"class": ["w", "f"]}, crs=None)
    assert not path.with_suffix(".prj").exists()
    with pytest.raises(InputError) as info:
        read_class_polygons(path, field="class")
    assert info.value.what == (
        "polygon file has no CRS; save it with a CRS in QGIS (Layer › Save As › CRS)"
    )
    assert info.value.where == str(path)


def test_a_projected_geojson_read_as_wgs84_is_named_not_reprojected(tmp_path: Path) -> None:
    # RFC 7946: a GeoJSON without a 'crs' member is WGS 84, so UTM metres arrive as degrees.
    geometries = [utm_box(s, r, c) for s, r, c, _ in FEATURES[:2]]
    path = write_vector(tmp_path / "p.geojson", geometries, {"class": ["w", "f"]}, crs="EPSG:4326")
    with pytest.raises(InputError) as info:
        read_class_polygons(path, field="class")
    assert info.value.what.startswith(
        "polygon coordinates (x 500000 to 500200, y 4.4998e+06 to 4.5e+06) are not longitude/latitude, "
        "but the file's CRS is EPSG:4326"
    )
    assert info.value.where == str(path)


def test_overlapping_polygons_of_different_classes_get_a_note(tmp_path: Path) -> None:
    # FEATURES[0] (water) and FEATURES[9] (forest) overlap; FEATURES[1] only touches FEATURES[0].
    polygons = read_class_polygons(write_class_polygons(tmp_path / "p.gpkg"), field="class")
    assert polygons.notes == [
        "1 pair(s) of polygons of different classes overlap (e.g. a 'water' and a 'forest' polygon); "
        "where they do, the class of the later one in the file counts"
    ]
    same_class = [f[:3] + ("water",) for f in FEATURES]
    polygons = read_class_polygons(write_class_polygons(tmp_path / "q.gpkg", same_class), field="class")
    assert polygons.notes == []


def test_self_intersecting_polygons_are_read(tmp_path: Path) -> None:
    # A "bow-tie" ring, as hand-drawn layers hold; the overlap check must not fail on it.
    bow_tie = shapely.Polygon([(-75.0, 40.0), (-74.9, 40.1), (-74.9, 40.0), (-75.0, 40.1)])
    assert not bow_tie.is_valid
    square = shapely.box(-75.0, 40.0, -74.95, 40.05)
    path = write_vector(tmp_path / "p.gpkg", [bow_tie, square], {"class": ["w", "f"]})
    polygons = read_class_polygons(path, field="class")
    assert polygons.classes == ["w", "f"]
    assert len(polygons.notes) == 1 and "overlap" in polygons.notes[0]


def test_points_and_lines_are_not_polygons(tmp_path: Path) -> None:
    points = write_vector(
        tmp_path / "pts.gpkg", [shapely.Point(-75, 40)], {"class": ["w"]}, geometry_type="Point"
    )
    with pytest.raises(InputError, match="no polygon layer.*pts \\(Point\\).*as polygons"):
        read_class_polygons(points, field="class")
    mixed = write_vector(
        tmp_path / "mixed.geojson",
        [shapely.LineString([(-75, 40), (-74, 41)]), shapely.Point(-75, 40)],
        {"class": ["w", "f"]},
        geometry_type="Unknown",
    )
    with pytest.raises(InputError, match="holds no polygon features"):
        read_class_polygons(mixed, field="class")

    # In a mixed layer, polygons count (also inside a collection) and the rest is skipped.
    square = feature_geometries(FEATURES[:1])[0]
    collection = shapely.GeometryCollection([square, shapely.Point(-75, 40)])
    mixed = write_vector(
        tmp_path / "mixed2.geojson",
        [collection, shapely.Point(-75, 40), shapely.MultiPolygon([square])],
        {"class": ["w", "f", "u"]},
        geometry_type="Unknown",
    )
    polygons = read_class_polygons(mixed, field="class")
    assert polygons.classes == ["w", "u"]
    assert polygons.geometries[0].equals(shapely.MultiPolygon([square]))
    assert polygons.notes == [
        "skipped 1 feature(s) without a polygon (points, lines, empty)",
        "1 pair(s) of polygons of different classes overlap (e.g. a 'w' and a 'u' polygon); "
        "where they do, the class of the later one in the file counts",
    ]


def test_unreadable_polygon_files(tmp_path: Path, label_paths: list[Path]) -> None:
    with pytest.raises(InputError, match="polygon file not found"):
        read_class_polygons(tmp_path / "missing.gpkg", field="class")
    with pytest.raises(InputError, match="not a vector file"):
        read_class_polygons(label_paths[0], field="class")


def test_empty_classes_are_skipped_and_reported(tmp_path: Path) -> None:
    geometries = feature_geometries(FEATURES[:3])
    path = write_vector(tmp_path / "p.gpkg", geometries, {"class": ["water", None, " "]})
    polygons = read_class_polygons(path, field="class")
    assert polygons.classes == ["water"]
    assert polygons.notes == ["skipped 2 polygon(s) with an empty 'class'"]
    path = write_vector(tmp_path / "q.gpkg", geometries, {"class": [None, "", None]})
    with pytest.raises(InputError, match="every polygon has an empty 'class'"):
        read_class_polygons(path, field="class")
    path = write_vector(tmp_path / "r.gpkg", geometries[:1], {"class": [UNCERTAIN]})
    with pytest.raises(InputError, match="reserved"):
        read_class_polygons(path, field="class")


def test_run_assign_rejects_a_bad_threshold_before_reading_anything(tmp_path: Path) -> None:
    for bad in (0, 1.01, -0.5):
        with pytest.raises(ConfigError, match=r"threshold must be in \(0, 1\]"):
            run_assign(
                label_paths=[tmp_path / "none.tif"],
                polygons_path=tmp_path / "none.gpkg",
                field="class",
                threshold=bad,
                out_dir=tmp_path,
            )


def test_label_rasters_of_different_clusterings_or_bad_labels(
    tmp_path: Path, label_paths: list[Path]
) -> None:
    polygons = read_class_polygons(write_class_polygons(tmp_path / "p.gpkg"), field="class")
    other = write_label_raster(
        scene_labels("b"), grid=GRIDS["b"], path=tmp_path / "c.tif", n_labels=7, overview_levels=[]
    )
    with pytest.raises(InputError, match="different clusterings \\(K=6 in a.tif, K=7 in c.tif\\)"):
        count_cluster_classes([label_paths[0], other], polygons)

    # A label of 9 with K=6: a damaged file, not something to count or reclassify silently.
    bad = tmp_path / "bad" / "a.tif"
    bad.parent.mkdir()
    labels = scene_labels("a")
    labels[0, 0] = 9
    profile = {"driver": "GTiff", "height": H, "width": W, "count": 1, "dtype": "uint8"}
    with rasterio.open(
        bad, "w", **profile, crs=UTM18N, transform=GRIDS["a"].transform, nodata=255
    ) as dst:
        dst.write(labels, 1)
        dst.update_tags(K=str(K))
    with pytest.raises(InputError, match="label 9, outside clusters 0..5"):
        count_cluster_classes([bad], polygons)
    mapping = build_mapping(count_cluster_classes(label_paths, polygons))
    with pytest.raises(InputError, match="label 9, outside clusters 0..5"):
        run_assign(
            label_paths=[bad],
            polygons_path=None,
            field="class",
            threshold=0.51,
            out_dir=tmp_path / "out",
            apply=write_mapping(tmp_path / "m.yaml", mapping),
        )


# --- windowed rasterization -------------------------------------------------------------


def test_small_polygons_on_a_huge_grid_burn_only_small_windows() -> None:
    grid = Grid(50_000, 50_000, Affine(10.0, 0.0, 0.0, 0.0, -10.0, 500_000.0), UTM18N)
    # Opposite corners: one window around both would be the whole 2.5-gigapixel grid.
    polygons = [
        shapely.box(1000, 499_000, 1100, 499_100),
        shapely.box(498_000, 1000, 498_500, 1200),
    ]
    pieces = list(burn_windows(polygons, np.array([0, 1]), grid=grid))
    assert sum(w.width * w.height for w, _ in pieces) <= 2 * 60 * 60
    assert sorted(int((b > 0).sum()) for _, b in pieces) == [100, 1000]


def test_windows_reproduce_a_whole_grid_rasterization() -> None:
    grid = Grid(300, 400, Affine(1.0, 0.0, 0.0, 0.0, -1.0, 300.0), UTM18N)
    rng = np.random.default_rng(0)
    polygons = []
    for _ in range(40):
        x, y = rng.uniform(-20, 400), rng.uniform(-20, 300)
        polygons.append(shapely.Point(x, y).buffer(rng.uniform(1, 60), quad_segs=4))
    classes = rng.integers(0, 5, len(polygons))
    reference = rasterio.features.rasterize(
        [(p, int(c) + 1) for p, c in zip(polygons, classes, strict=True)],
        out_shape=grid.shape,
        transform=grid.transform,
        dtype="int32",
    )

    composite = np.zeros(grid.shape, dtype=np.int32)
    covered = np.zeros(grid.shape, dtype=np.int32)
    for window, burnt in burn_windows(polygons, classes, grid=grid, max_pixels=5000):
        assert window.width * window.height <= 5000
        rows, cols = window.toslices()
        composite[rows, cols] = np.where(burnt > 0, burnt, composite[rows, cols])
        covered[rows, cols] += burnt > 0
    assert covered.max() == 1  # no pixel is counted twice
    np.testing.assert_array_equal(composite, reference)


def test_numeric_class_codes_are_ordered_by_value(tmp_path: Path, label_paths: list[Path]) -> None:
    # Land-cover codes (NLCD-style): as text, 100 would come before 21 and 9.
    codes = [21, 100, 9, 41, 21, 9]
    geometries = [utm_box(scene, rows, cols) for scene, rows, cols, _ in FEATURES[: len(codes)]]
    path = write_vector(tmp_path / "codes.gpkg", geometries, {"class": codes}, crs="EPSG:32618")
    polygons = read_class_polygons(path, field="class")
    assert polygons.class_names == ["9", "21", "41", "100"]
    mapping = build_mapping(count_cluster_classes(label_paths, polygons), threshold=0.51)
    assert mapping.classes == sorted(mapping.classes, key=float)


def test_a_class_drawn_off_every_scene_is_named_in_the_notes(tmp_path: Path, label_paths: list[Path]) -> None:
    features = [*FEATURES, ("a", (-2000, -1990), (-2000, -1990), "marsh")]  # 20 km off, in no scene
    geometries = [utm_box(scene, rows, cols) for scene, rows, cols, _ in features]
    path = write_vector(tmp_path / "classes.gpkg", geometries, {"class": [f[3] for f in features]}, crs="EPSG:32618")
    result = run_assign(label_paths=label_paths, polygons_path=path, field="class", threshold=0.51, out_dir=tmp_path)
    assert (
        "class marsh: no polygon covers a valid pixel of these scenes (drawn elsewhere, or over nodata); "
        "no cluster can go to it"
    ) in result.notes
    plain = run_assign(
        label_paths=label_paths, polygons_path=write_class_polygons(tmp_path / "c.gpkg"), field="class",
        threshold=0.51, out_dir=tmp_path / "plain",
    )
    assert not any("no polygon covers" in note for note in plain.notes)


def test_class_colours_set_in_the_mapping_colour_the_class_rasters_and_survive_a_recount(
    tmp_path: Path, label_paths: list[Path]
) -> None:
    polygons = write_class_polygons(tmp_path / "classes.gpkg")
    out = tmp_path / "out"
    first = run_assign(label_paths=label_paths, polygons_path=polygons, field="class", threshold=0.51, out_dir=out)
    text = first.mapping_path.read_text()
    assert "colors:" not in yaml.safe_load(text)
    # The user gives water its colour (as the header shows how) and re-applies.
    first.mapping_path.write_text(text.replace("clusters:\n", "colors: {water: '#1F78B4'}\nclusters:\n", 1))
    applied = run_assign(
        label_paths=label_paths, polygons_path=None, field="class", threshold=0.51, out_dir=out,
        apply=first.mapping_path,
    )
    water = applied.mapping.output_classes.index("water")
    with rasterio.open(applied.class_paths[0]) as src:
        assert src.colormap(1)[water][:3] == (0x1F, 0x78, 0xB4)
    assert "color=\"#1f78b4\"" in applied.class_paths[0].with_suffix(".qml").read_text()
    # Counting anew keeps the colour of a class that is still there.
    again = run_assign(label_paths=label_paths, polygons_path=polygons, field="class", threshold=0.51, out_dir=out)
    assert again.mapping.colors == {"water": "#1f78b4"}
    assert yaml.safe_load(again.mapping_path.read_text())["colors"] == {"water": "#1f78b4"}


@pytest.mark.parametrize(
    ("colors", "message"),
    [
        ("{watr: '#1f78b4'}", "colour for unknown class 'watr' (did you mean 'water'?)"),
        ("{water: '#1f78b'}", "class water: colour '#1f78b' is not '#rrggbb'"),
        ("[water]", "'colors' must map class names to colours"),
    ],
)
def test_a_bad_class_colour_is_a_one_line_error(
    tmp_path: Path, label_paths: list[Path], colors: str, message: str
) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(f"classes: [forest, water]\ncolors: {colors}\nclusters: {{0: water, 1: forest}}\n")
    with pytest.raises(ConfigError) as err:
        load_mapping(path, n_labels=K)
    assert err.value.what.startswith(message) and err.value.where == f"{path}: colors"


@pytest.mark.parametrize("threshold", [5e-05, 1e-9, 0.51, 1.0])
def test_a_mapping_written_with_any_threshold_applies_again(
    tmp_path: Path, label_paths: list[Path], threshold: float
) -> None:
    # Python writes 5e-05, which YAML 1.1 reads as a string.
    polygons = write_class_polygons(tmp_path / "classes.gpkg")
    result = run_assign(
        label_paths=label_paths, polygons_path=polygons, field="class", threshold=threshold, out_dir=tmp_path / "out"
    )
    assert load_mapping(result.mapping_path, n_labels=K).threshold == threshold
    # As earlier versions wrote it (5e-05: a string to YAML 1.1), it applies too.
    old = result.mapping_path.read_text().replace(f"threshold: {yaml.safe_dump(threshold)[:-5]}", f"threshold: {threshold}")
    result.mapping_path.write_text(old)
    assert f"threshold: {threshold}\n" in old
    assert load_mapping(result.mapping_path, n_labels=K).threshold == threshold


def test_a_scene_without_crs_is_left_out_of_the_count_but_still_gets_classes(
    tmp_path: Path, label_paths: list[Path]
) -> None:
    unplaced = tmp_path / "labels" / "c.tif"
    write_label_raster(
        scene_labels("a"), grid=Grid(H, W, Affine.identity(), None), path=unplaced, n_labels=K, overview_levels=[]
    )
    polygons = write_class_polygons(tmp_path / "classes.gpkg")
    result = run_assign(
        label_paths=[*label_paths, unplaced], polygons_path=polygons, field="class", threshold=0.51,
        out_dir=tmp_path / "out",
    )
    np.testing.assert_array_equal(result.counts.counts, EXPECTED_COUNTS)
    assert result.counts.unplaced == ["c"]
    assert any(note.startswith("scene c: no CRS") for note in result.notes)
    lut = np.array([{"forest": 0, "water": 1, UNCERTAIN: 2}[c] for c in EXPECTED_MAPPING])
    labels = scene_labels("a")
    np.testing.assert_array_equal(
        read_band(tmp_path / "out" / "classes" / "c.tif")[0], np.where(labels == 255, 255, lut[np.minimum(labels, K - 1)])
    )
    # Alone, it leaves nothing to count on.
    with pytest.raises(InputError, match="has no CRS"):
        run_assign(label_paths=[unplaced], polygons_path=polygons, field="class", threshold=0.51, out_dir=tmp_path / "x")


def test_polygons_that_overlap_no_scene_are_named_beside_those_that_count(tmp_path: Path, label_paths: list[Path]) -> None:
    far_away = [("a", (-2000, -1990), (-2000, -1990), "water"), ("b", (900, 910), (900, 910), "marsh")]
    polygons = write_class_polygons(tmp_path / "classes.gpkg", [*FEATURES, *far_away])
    result = run_assign(
        label_paths=label_paths, polygons_path=polygons, field="class", threshold=0.51, out_dir=tmp_path / "out"
    )
    assert f"2 of {len(FEATURES) + 2} polygons (class marsh, water) overlap no scene and are not counted; " \
        "check their CRS and extent" in result.notes
