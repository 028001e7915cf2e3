"""The version ``peer --version`` and ``peer-relay --version`` print."""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata
from pathlib import Path

DISTRIBUTION = "peer-relay"
_SOURCE_TREE = Path(__file__).resolve().parent.parent


def version() -> str:
    """The installed distribution's version; run from a source tree, its setup.cfg's.

    The source tree wins when there is one: a checkout run with PYTHONPATH may be newer than
    whatever is installed, and reporting the installed version would mislead.
    """
    setup = _SOURCE_TREE / "setup.cfg"
    if setup.is_file() and (_SOURCE_TREE / "peer" / "cli.py").is_file():
        config = configparser.ConfigParser()
        try:
            config.read(setup, encoding="utf-8")
            return config["metadata"]["version"]
        except (configparser.Error, KeyError, UnicodeDecodeError):
            pass
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class VersionAction(argparse.Action):
    """``--version``, looked up only when asked: importlib.metadata costs 25 ms, and every
    start would pay it if the version were part of the parser."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the version and exit"):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {version()}")
        parser.exit()
