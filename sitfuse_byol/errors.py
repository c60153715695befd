"""The project's exception hierarchy.

Every error a user can cause derives from :class:`SitfuseError`. The CLI turns
one into a single line, ``error: <what> (<where>)``, and exit code 2.
"""

from __future__ import annotations


class SitfuseError(Exception):
    """Base class for errors caused by input, configuration or models.

    Args:
        what: What went wrong, in words a user understands.
        where: The file, scene, config key or other place it went wrong.
    """

    def __init__(self, what: str, *, where: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.where = where

    def __str__(self) -> str:
        return f"{self.what} ({self.where})" if self.where else self.what


class InputError(SitfuseError):
    """A scene, band, scene list or label file cannot be used."""


class ShardError(InputError):
    """What one rank's own share of the data cannot give (under torchrun each rank reads its
    own shard): said by the rank that meets it, which may not be rank 0."""


class EmptySceneError(InputError):
    """A scene without a valid pixel to sample: a property of its data, not a passing failure."""


class ConfigError(SitfuseError):
    """A configuration key, type or value is wrong."""


class ModelError(SitfuseError):
    """A checkpoint or clustering model does not fit the data or each other."""


#: The start of rasterio's warning for a raster without georeferencing; the pipeline says
#: so once per scene instead (``warnings.filterwarnings(message=...)`` needs no rasterio import).
NOT_GEOREFERENCED_WARNING = "Dataset has no geotransform"


#: ``extra=`` for a log record meant for the run's log file, not the console: a scene's
#: failure (the summary lists it) or the error the command prints as its one line anyway.
FOR_LOG_FILE = {"log_file_only": True}
