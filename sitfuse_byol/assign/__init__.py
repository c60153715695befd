"""Context assignment: name the clusters after the class polygons a user drew in QGIS.

:func:`run_assign` is what ``sitfuse assign`` calls; the steps are public too.
Needs the ``gis`` extra (pyogrio, shapely) for reading polygons.
"""

from __future__ import annotations

from sitfuse_byol.assign.mapping import (
    DEFAULT_THRESHOLD,
    AssignResult,
    ClusterMapping,
    CountTable,
    apply_mapping,
    build_mapping,
    check_threshold,
    count_cluster_classes,
    format_class_table,
    load_mapping,
    run_assign,
    write_mapping,
)
from sitfuse_byol.assign.polygons import UNCERTAIN, ClassPolygons, read_class_polygons

__all__ = [
    "DEFAULT_THRESHOLD",
    "UNCERTAIN",
    "AssignResult",
    "ClassPolygons",
    "ClusterMapping",
    "CountTable",
    "apply_mapping",
    "build_mapping",
    "check_threshold",
    "count_cluster_classes",
    "format_class_table",
    "load_mapping",
    "read_class_polygons",
    "run_assign",
    "write_mapping",
]
