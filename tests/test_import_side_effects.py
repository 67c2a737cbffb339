"""Importing the library has no global side effects: no matplotlib (backend choice, fonts) and
no attack suite (evaluation only) in a process that merely serves or repairs; drawing a
heatmap does not go through pyplot either. One fresh interpreter checks it all (start-up of
torch is the slow part)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_MODULES = (
    "models.importing",
    "nnoculation.pipeline",
    "nnoculation.reports",
    "nnoculation.training",
)


def test_importing_the_library_loads_neither_matplotlib_nor_the_attack_suite(
    tmp_path: Path,
) -> None:
    png = tmp_path / "h.png"
    code = (
        "import nnoculation.repair.engine, nnoculation.deployment, service.app, worker.jobs\n"
        "import models.store, models.bundle, sys\n"
        "assert 'matplotlib' not in sys.modules and 'nnoculation.attacks' not in sys.modules\n"
        f"import {', '.join(LIBRARY_MODULES)}\n"
        "bad = sorted(m for m in sys.modules if m == 'matplotlib' or m.startswith("
        "('matplotlib.', 'nnoculation.attacks')))\n"
        "assert not bad, bad\n"
        # pyplot picks a backend and keeps global figure state; heatmap never imports it
        "from pathlib import Path\n"
        "from nnoculation.predeploy import Cell, PredeployConfig, PredeployResult\n"
        "from nnoculation.reports import heatmap\n"
        "cfg = PredeployConfig(alpha0=1e-3, alpha_multiples=(1,), gammas=(0.3,))\n"
        "result = PredeployResult(config=cfg, baseline_ca=0.9, cells=[Cell(1e-3, 0.3, 0.88, 1.0)],"
        " picked=None, goodnet=None, seconds=1.0)\n"
        f"heatmap(result, 'holdout_ca', Path({str(png)!r}), 'CA')\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert png.read_bytes()[:4] == b"\x89PNG"
