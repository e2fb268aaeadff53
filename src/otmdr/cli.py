"""The ``otmdr`` command. Training, evaluation and comparison commands arrive with the pipeline;
for now it reports the version and the available models."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="otmdr", description="OT-MDR, SAM and ASAM for PyTorch")
    parser.add_argument("--version", action="version", version=f"otmdr {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("models", help="list the registered models with their parameter counts")
    args = parser.parse_args(argv)
    if args.command == "models":
        from .models import count_parameters, create_model, list_models

        for name in list_models():
            print(f"{name:12s} {count_parameters(create_model(name)) / 1e6:8.3f}M parameters (10 classes)")
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
