"""`python -m vsbench.models --print`: parameter counts and shapes at the default sizes."""

from __future__ import annotations

import argparse

from vsbench.models import ARCHS, describe

# the schema defaults (workflow/schemas/config.schema.yaml) of the settings models read
DEFAULTS = {"base_channels": 8, "depth": 2, "crop": [8, 64, 64]}


def table(settings: dict) -> str:
    rows = ["| arch | params | input | output | divisibility (z, y, x) |", "|---|---:|---|---|---|"]
    for arch in ARCHS:
        d = describe(arch, settings)
        shape = lambda t: "×".join(map(str, t))  # noqa: E731
        n_d = d["discriminator_params"]
        params = f"{d['params'] - n_d:,} + {n_d:,} (D)" if n_d else f"{d['params']:,}"
        rows.append(
            f"| {arch} | {params} | {shape(d['input'])} | {shape(d['output'])} "
            f"| {shape(d['divisibility'])} |"
        )
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vsbench.models", description=__doc__)
    p.add_argument("--print", action="store_true", help="print the architecture table")
    p.add_argument("--base-channels", type=int, default=DEFAULTS["base_channels"])
    p.add_argument("--depth", type=int, default=DEFAULTS["depth"])
    p.add_argument("--crop", type=int, nargs=3, default=DEFAULTS["crop"], metavar=("Z", "Y", "X"))
    args = p.parse_args(argv)
    settings = {"base_channels": args.base_channels, "depth": args.depth, "crop": args.crop}
    print(f"settings: {settings}")
    print(table(settings))


if __name__ == "__main__":
    main()
