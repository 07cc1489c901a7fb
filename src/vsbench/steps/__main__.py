"""Run a step script by hand, outside Snakemake.

    python -m vsbench.steps preprocess \\
        --input raw=datasets/ipsc/raw.zarr \\
        --output store=/tmp/pre.zarr \\
        --params params.json            # a JSON object of the rule's params

Repeated names (`--input phase=a.zarr --input phase=b.zarr`) become lists.
The step sees the same `snakemake.input/output/params/log/threads` as under
Snakemake, so a failing job can be rerun and debugged directly.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path


class Namespace(list):
    """Positional list with named attributes, like Snakemake's Namedlist."""

    def __init__(self, pairs=()):
        merged: dict = {}
        for key, value in pairs:
            if key in merged:
                prev = merged[key]
                merged[key] = (prev if isinstance(prev, list) else [prev]) + [value]
            else:
                merged[key] = value
        super().__init__(merged.values())
        self.__dict__.update(merged)


def _pairs(items):
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected name=path, got {item!r}")
        out.append((key, value))
    return out


def main(argv=None) -> int:
    steps_dir = Path(__file__).parent
    choices = sorted(p.stem for p in steps_dir.glob("*.py") if not p.stem.startswith("_"))
    parser = argparse.ArgumentParser(
        prog="python -m vsbench.steps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("step", choices=choices)
    parser.add_argument("--input", action="append", metavar="NAME=PATH")
    parser.add_argument("--output", action="append", metavar="NAME=PATH")
    parser.add_argument("--params", metavar="JSON_FILE", help="JSON object of params")
    parser.add_argument("--rule", help="rule name when a step serves several rules")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", default=None, help="log file (default: stderr)")
    args = parser.parse_args(argv)
    params = json.loads(Path(args.params).read_text()) if args.params else {}
    if not isinstance(params, dict):
        raise SystemExit(f"{args.params}: params must be a JSON object")
    snakemake = argparse.Namespace(
        input=Namespace(_pairs(args.input)),
        output=Namespace(_pairs(args.output)),
        params=Namespace(params.items()),
        log=[args.log] if args.log else [],
        threads=args.threads,
        rule=args.rule or args.step,
        wildcards=Namespace(),
    )
    runpy.run_path(
        str(steps_dir / f"{args.step}.py"),
        init_globals={"snakemake": snakemake},
        run_name="__main__",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
