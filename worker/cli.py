"""``nnoculation worker`` (registered through the ``nnoculation.commands`` entry point, so the
library's CLI never imports this package)."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError
from pydantic_settings import SettingsError

from nnoculation.online.settings import describe_errors

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "worker",
        help="run the repair worker (RQ) for one deployment; settings from NNOC_* variables",
    )
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.settings import WorkerSettings  # (imports no prometheus-client)

    try:
        settings = WorkerSettings()
    except (ValidationError, SettingsError) as err:
        print(f"usage error: invalid worker settings:\n{describe_errors(err)}", file=sys.stderr)
        return 2
    from nnoculation.online.metrics_dir import prepare_metrics_dir

    prepare_metrics_dir("nnoc-worker-metrics-")  # before anything imports prometheus-client
    from worker.main import run

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return run(settings, burst=args.burst)
