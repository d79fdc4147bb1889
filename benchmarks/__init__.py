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


def write_results(result: dict, out, stem: str, markdown_of) -> dict:
    """result written as <out>/<stem>.json, with markdown_of(result) as
    <out>/<stem>.md (out made if needed) and both paths in result["files"];
    returns result."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result["files"] = {"json": str(out / f"{stem}.json"), "markdown": str(out / f"{stem}.md")}
    write_report(result, result["files"]["json"], result["files"]["markdown"], markdown_of(result))
    return result


def cli_main(run, args, failed=lambda result: False) -> int:
    """A benchmark's main: run(args), then its markdown report and where the
    results went (with elapsed_s when run gives it); exit status 2 and the
    message for ValueError / RuntimeError (options it cannot honour), 1 when
    failed(result)."""
    import sys

    try:
        result = run(args)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(Path(result["files"]["markdown"]).read_text())
    elapsed = f"  ({result['elapsed_s']:.0f} s)" if "elapsed_s" in result else ""
    print(f"results: {result['files']['json']}{elapsed}")
    return 1 if failed(result) else 0


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
