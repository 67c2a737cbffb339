"""Open the model store a location names: ``s3://bucket/prefix`` or a local directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from models.s3_objects import SCHEME, S3Location, require_boto3

if TYPE_CHECKING:
    from models.store_base import BundleStore

DEFAULT_CACHE_DIR = Path("store-cache")


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names object storage rather than a directory."""
    return isinstance(location, str) and location.startswith(SCHEME)


def check_location(location: str | os.PathLike[str]) -> str:
    """``location`` as a string, validated if it is an ``s3://`` URL (``InvalidNameError``)."""
    text = os.fspath(location)
    if is_remote(text):
        S3Location.parse(text)
        require_boto3()
    elif not text:
        raise ValueError("the store location is empty")
    return text


def open_store(location: str | os.PathLike[str], cache_dir: Path | None = None) -> BundleStore:
    """The store at ``location``: :class:`models.s3_store.S3Store` for ``s3://bucket/prefix``
    (bundles are read through ``cache_dir``, default ``./store-cache``), else
    :class:`models.store.ModelStore` on that directory."""
    text = check_location(location)
    if is_remote(text):
        from models.s3_store import S3Store

        return S3Store(text, cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)
    from models.store import ModelStore

    return ModelStore(Path(text))
