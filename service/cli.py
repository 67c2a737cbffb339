"""``nnoculation serve`` (registered through the ``nnoculation.commands`` entry point, so the
library's CLI never imports this package): validates the settings, prepares the metrics
folder shared by the uvicorn workers, and replaces itself with uvicorn running the app
factory. The exec keeps the supervisor light: uvicorn spawns its workers by re-importing the
parent's main module, which would otherwise be the whole library CLI (torch included), and a
worker that takes longer than the health-check timeout to start is killed and restarted."""

from __future__ import annotations

import argparse
import os
import sys

from pydantic import ValidationError
from pydantic_settings import SettingsError

from nnoculation.online.settings import describe_errors

WORKER_HEALTHCHECK_S = 60


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the online API (uvicorn); settings from NNOC_* variables")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, help="uvicorn worker processes (default NNOC_WORKERS)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.workers is not None:
        if args.workers < 1:
            print("usage error: --workers must be at least 1", file=sys.stderr)
            return 2
        os.environ["NNOC_WORKERS"] = str(args.workers)
    from service.settings import ServiceSettings

    try:
        settings = ServiceSettings()
    except (ValidationError, SettingsError) as err:
        print(f"usage error: invalid service settings:\n{describe_errors(err)}", file=sys.stderr)
        return 2
    from nnoculation.online.metrics_dir import prepare_metrics_dir

    prepare_metrics_dir("nnoc-api-metrics-")
    argv = [
        sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
        "--host", args.host, "--port", str(args.port), "--workers", str(settings.workers),
        "--log-level", args.log_level, "--no-access-log", "--timeout-graceful-shutdown", "10",
        # Loading torch and the deployment takes seconds on a busy machine.
        "--timeout-worker-healthcheck", str(WORKER_HEALTHCHECK_S),
    ]  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached
