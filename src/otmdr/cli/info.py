"""``otmdr config``, ``otmdr models``, ``otmdr datasets``: what is available and what a config means."""

from __future__ import annotations

import argparse

from ._common import run_config


def cmd_config(args: argparse.Namespace) -> int:
    """Print the (resolved) config with every key annotated: the defaults, or a file with --set."""
    from ..config import describe_config

    print(describe_config(run_config(args)))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from ..models import describe_models

    for name, parameters, description in describe_models():
        print(f"{name:18s} {parameters / 1e6:8.3f}M  {description}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from ..data import list_datasets

    for spec in list_datasets():
        where = "embedded (no --data-dir needed)" if not spec.needs_root else spec.layout
        print(f"{spec.name:16s} {spec.num_classes:4d} classes  {spec.in_channels}x{spec.image_size}x{spec.image_size}")
        print(f"{'':16s} layout: {where}")
        if spec.needs_root:
            print(f"{'':16s} get it: {spec.how_to_get}")
    return 0

