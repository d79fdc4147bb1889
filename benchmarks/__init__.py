"""bnfast benchmarks: the kernel benchmark, the CIFAR-10 training benchmark and the suite."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def write_report(result: dict, json_path, markdown_path, markdown: str) -> None:
    """Write one benchmark's results: its markdown report and the JSON of result."""
    Path(markdown_path).write_text(markdown)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)


def merge_options(parser: argparse.ArgumentParser, options=None, overrides=None) -> argparse.Namespace:
    """The parser's defaults, then options (a Namespace or a dict, "-" or "_"
    in names), then overrides: how each benchmark's run() takes its options."""
    args = parser.parse_args([])
    if options is not None:
        items = vars(options) if isinstance(options, argparse.Namespace) else dict(options)
        for k, v in items.items():
            setattr(args, k.replace("-", "_"), v)
    for k, v in (overrides or {}).items():
        setattr(args, k, v)
    return args
