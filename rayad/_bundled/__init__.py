"""Files the commands need, shipped inside the package.

pyproject.toml maps the top-level folders of the source tree (their source of truth) onto subpackages here,
so a wheel and an editable install both hold them:

    rayad._bundled.dashboard    <- dashboard/     the Streamlit app (`rayad dashboard`)
    rayad._bundled.tune_spaces  <- tune_spaces/   the search spaces demo, quick, quality, paper, ablation
    rayad._bundled.serve        <- serve/         the Serve config template (`serve deploy`, a RayService)
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from rayad.errors import RayadError

FOLDERS = ("dashboard", "tune_spaces", "serve")


def bundled(folder: str) -> Path:
    """The installed folder (one of FOLDERS) on the file system, found through the package."""
    if folder not in FOLDERS:
        raise ValueError(f"{folder!r} is not one of {FOLDERS}")
    resource = files(f"{__name__}.{folder}")
    if not isinstance(resource, Path):  # a zipped install: Streamlit and Ray need real paths
        raise RayadError(f"rayad's bundled {folder}/ is not on the file system ({resource}); install rayad unzipped")
    return resource
