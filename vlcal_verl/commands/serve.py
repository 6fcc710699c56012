"""``vlcal serve``: run the reward server (the same flags as ``python -m reward_server``)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from reward_server.settings import add_arguments as add_server_arguments

    add_server_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from reward_server.__main__ import serve
    from reward_server.settings import from_args

    try:
        settings = from_args(args)
    except ValueError as err:
        print(f"vlcal serve: {err}", file=sys.stderr)
        return 2
    return serve(settings)
