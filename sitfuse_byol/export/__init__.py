"""Writing results: label COGs, QGIS styles, attribute tables, quicklooks, polygons.

The core writers are re-exported here. :mod:`~sitfuse_byol.export.quicklook`
(matplotlib) and :mod:`~sitfuse_byol.export.polygons` (the optional ``gis``
extra: pyogrio, shapely) are imported from their modules, so importing this
package stays light.
"""

from __future__ import annotations

from sitfuse_byol.export.atomic import atomic_path, atomic_write_json, atomic_write_text
from sitfuse_byol.export.label_raster import label_dtype_and_nodata, write_label_raster
from sitfuse_byol.export.palette import hierarchical_colors, label_colors
from sitfuse_byol.export.sidecars import aux_xml_path_for, qml_path_for, write_qml, write_rat

__all__ = [
    "atomic_path",
    "atomic_write_json",
    "atomic_write_text",
    "aux_xml_path_for",
    "hierarchical_colors",
    "label_colors",
    "label_dtype_and_nodata",
    "qml_path_for",
    "write_label_raster",
    "write_qml",
    "write_rat",
]
