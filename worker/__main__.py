"""``python -m worker``: the same as ``nnoculation worker``."""

import argparse
import sys

from worker.cli import register

parser = argparse.ArgumentParser(prog="python -m worker")
register(parser.add_subparsers(dest="command"))
args = parser.parse_args(["worker", *sys.argv[1:]])
sys.exit(args.func(args))
