"""``python -m service``: the same as ``nnoculation serve``."""

import argparse
import sys

from service.cli import register

parser = argparse.ArgumentParser(prog="python -m service")
register(parser.add_subparsers(dest="command"))
args = parser.parse_args(["serve", *sys.argv[1:]])
sys.exit(args.func(args))
