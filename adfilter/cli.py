"""The `adfilter` command. Each subcommand imports its heavy dependencies only when it runs."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from adfilter.config import ParamsError, load_params


def _cmd_profile(args: argparse.Namespace) -> int:
    path = Path(args.params)
    text = path.read_text(encoding="utf-8")
    load_params(path, profile=args.name)  # fails, naming the profile, before anything is written
    new, count = re.subn(r"(?m)^profile:\s*\S+", f"profile: {args.name}", text, count=1)
    if count != 1:
        raise ParamsError(f"{path}: no top-level 'profile:' line to set")
    path.write_text(new, encoding="utf-8")
    print(f"{path}: profile set to '{args.name}'")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    import json

    from adfilter.config import to_dict

    print(json.dumps(to_dict(load_params(args.params, profile=args.profile)), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adfilter", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="path to params.yaml")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="select the params profile (default, ci, gpu)")
    p.add_argument("name")
    p.set_defaults(func=_cmd_profile)

    p = sub.add_parser("params", help="print the resolved parameters as JSON")
    p.add_argument("--profile", default=None)
    p.set_defaults(func=_cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ParamsError as exc:
        print(f"adfilter: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
