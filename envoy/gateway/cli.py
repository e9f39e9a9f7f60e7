"""`python -m gateway`: run, print or validate the gateway for `CHATMESH_GATEWAY_*` settings.

python -m gateway              # run Envoy with CHATMESH_GATEWAY_* settings
python -m gateway --print      # print the rendered config
python -m gateway --validate   # render, then `envoy --mode validate`
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from chatmesh.common.private_files import keep_files_private
from gateway.config import render_envoy_config
from gateway.process import serve
from gateway.settings import GatewaySettings
from gateway.validate import validate_settings


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m gateway`; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--print", action="store_true", help="print the rendered config and exit")
    action.add_argument("--validate", action="store_true", help="validate the rendered config and exit")
    parser.add_argument(
        "--workdir", type=Path, default=Path(".run/gateway"), help="where the config and log go"
    )
    args = parser.parse_args(argv)
    try:
        settings = GatewaySettings()
        if args.print:
            sys.stdout.write(render_envoy_config(settings))
            return 0
        if args.validate:
            path, output = validate_settings(settings, args.workdir)
            print(output.strip() or f"{path}: OK")
            return 0
        keep_files_private()  # Envoy's config holds the JWT secret; its log, callers' addresses
        asyncio.run(serve(settings, args.workdir))
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    return 0
