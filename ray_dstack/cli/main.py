"""`ray-dstack` console script: one module per command group, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

from ray_dstack.cli import output
from ray_dstack.errors import RayDstackError

# Modules under ray_dstack.cli that define `register(subparsers)`; each sets `func` on its parsers.
COMMAND_MODULES = ["plan_cmd", "service_cmds", "chat_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-dstack",
        description="Run dstack service configurations (*.dstack.yml) on Ray Serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"ray_dstack.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"ray_dstack.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except RayDstackError as exc:
        output.error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        output.error("interrupted")
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
