"""prometheus-client's multiprocess folder, prepared before the client is first imported:
it picks file-backed values at import time, and forked children (uvicorn workers, RQ work
horses) inherit whatever the parent imported."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_metrics_dir(prefix: str) -> Path:
    """Use ``$PROMETHEUS_MULTIPROC_DIR`` (emptied, as the client requires at start) or a new
    temporary folder, and export it for this process and its children."""
    given = os.environ.get(MULTIPROC_ENV)
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix=prefix))
    if given and path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path
