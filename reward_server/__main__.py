"""``python -m reward_server --host H --port P [--workers N] [--timeout S] ...`` (see ``--help``)."""

from __future__ import annotations

import argparse
import sys

from reward_server import settings as settings_mod


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reward_server",
        description="VL-Calibration reward server (flags override VLCAL_RS_* environment variables)",
    )
    settings_mod.add_arguments(parser)
    return parser


def serve(settings: settings_mod.ServerSettings) -> int:
    """Run uvicorn in this process until SIGINT/SIGTERM; returns the exit code.

    Shutdown is graceful within ``settings.shutdown_grace_s`` (see :mod:`reward_server.shutdown`)."""
    import uvicorn

    from reward_server.app import create_app
    from reward_server.shutdown import draining_server

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # per-request lines would dominate the log at RL batch rates; see /metrics
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    server = draining_server(config, app.fastapi.state.drain)
    server.run()
    return 0 if server.started else 3  # uvicorn.run's exit code when start-up failed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_mod.from_args(args)
    except ValueError as err:
        print(f"reward_server: {err}", file=sys.stderr)
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
