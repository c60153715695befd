"""Band selection by 1-based index or by name."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from sitfuse_byol.errors import InputError

BandSpec = Sequence[int | str] | None


def select_bands(names: Sequence[str], bands: BandSpec, *, where: str) -> list[int]:
    """Resolve a band selection to 0-based positions.

    Args:
        names: Names of the scene's bands, in file order.
        bands: ``None`` for all bands, else 1-based indices (as GDAL and QGIS count)
            and/or band names.
        where: The scene, for messages.

    Raises:
        InputError: For an index out of range or an unknown name.
    """
    if bands is None:
        return list(range(len(names)))
    positions = []
    for band in bands:
        if isinstance(band, bool):
            raise InputError(f"band {band!r} is neither an index nor a name", where=where)
        if isinstance(band, int):
            if not 1 <= band <= len(names):
                raise InputError(
                    f"band index {band} out of range 1..{len(names)} (bands count from 1)",
                    where=where,
                )
            positions.append(band - 1)
        elif band in names:
            positions.append(list(names).index(band))
        else:
            close = difflib.get_close_matches(str(band), list(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; bands are {', '.join(names)}"
            raise InputError(f"unknown band name {band!r}{hint}", where=where)
    if len(set(positions)) != len(positions):
        raise InputError("a band is selected twice", where=where)
    return positions


def in_another_order(names: Sequence[str], reference: Sequence[str]) -> bool:
    """Whether ``names`` are ``reference``'s bands in another order: read by position,
    blue would pass for near-infrared."""
    return list(names) != list(reference) and sorted(names) == sorted(reference) and len(set(names)) == len(names)
