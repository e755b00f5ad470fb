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


# --------------------------------------------------------------------------- serve (serving/)


def _cmd_serve(args: argparse.Namespace) -> int:
    from adfilter.logs import setup_logging
    from serving.server import serve

    setup_logging()
    params = load_params(args.params, profile=args.profile)
    serve(
        params,
        host=args.host,
        port=args.port,
        bundle=args.bundle,
        cascade=False if args.deep_only else None,
        store_url=args.store_url,
        poll_seconds=args.poll_seconds,
        tracking_uri=args.tracking_uri,
    )
    return 0


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP API: fastText gate + TorchScript model cascade")
    p.add_argument("--host", default=None, help="default: serve.host")
    p.add_argument("--port", type=int, default=None, help="default: serve.port")
    p.add_argument("--bundle", default=None,
                   help="a bundle folder or models:/ad-filter@champion (default: serve.bundle)")
    p.add_argument("--deep-only", action="store_true",
                   help="send every post to the deep model (no gate): the benchmark baseline")
    p.add_argument("--store-url", default=None, help="SQLAlchemy URL (default: serve.store.url)")
    p.add_argument("--poll-seconds", type=float, default=None,
                   help="reload check interval, 0 = never (default: serve.reload.poll_seconds)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking/registry URI for models:/ bundles (default: mlflow.tracking_uri)")
    p.add_argument("--profile", default=None, help="params profile (default: the selected one)")
    p.set_defaults(func=_cmd_serve)


# --------------------------------------------------------------------------- drift + simulate (monitoring)


def _cmd_drift(args: argparse.Namespace) -> int:
    import json
    import logging

    from adfilter.logs import setup_logging

    setup_logging("WARNING" if args.json else None)
    logging.getLogger("tasks.drift").setLevel(logging.WARNING if args.json else logging.INFO)
    params = load_params(args.params, profile=args.profile)
    from tasks.drift import build_reference_set, drift

    if args.build_reference:
        out = build_reference_set(params, args.bundle, args.reference)
        print(json.dumps({"reference": str(out)}) if args.json else f"drift reference written to {out}")
        return 0
    result = drift(
        params,
        args.store,
        args.reference,
        Path(args.out),
        bundle=args.bundle,
        since=args.since,
        limit=args.limit,
        report_path=Path(args.report) if args.report else None,
        log_mlflow=False if args.no_mlflow else None,
        progress=not args.json,
    )
    if args.json:
        print(json.dumps(result, default=str))
    else:
        shift = "n/a" if result["shift"] is None else f"{result['shift']:.3f}"
        print(f"shift {shift} (threshold {result['threshold']:g}): "
              f"retrain {'yes' if result['retrain'] else 'no'}\n{result['reason']}")
    return 0


def _add_drift_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("drift", help="SHAP feature-importance shift of recent traffic (retrain above "
                       "drift.threshold) + Evidently drift report")
    p.add_argument("--store", default=None, help="prediction store URL (default: drift.store_url, "
                   "else serve.store.url)")
    p.add_argument("--reference", default=None,
                   help="reference folder (default: the bundle's reference/, else drift.reference)")
    p.add_argument("--bundle", default=None, help="model bundle folder or models:/ URI "
                   "(default: drift.bundle, else serve.bundle)")
    p.add_argument("--since", default=None, help="window start, ISO time in UTC "
                   "(default: now - drift.window_hours)")
    p.add_argument("--limit", type=int, default=None, help="at most this many recent posts "
                   "(default: drift.window_posts)")
    p.add_argument("--out", default="reports/drift", help="folder of the HTML/JSON/PNG reports")
    p.add_argument("--report", default=None, help="result JSON (default: reports/drift.json)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    p.add_argument("--build-reference", action="store_true",
                   help="only draw the reference set (into --reference or drift.reference)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--profile", default=None, help="params profile (default: the selected one)")
    p.set_defaults(func=_cmd_drift)


def _cmd_simulate(args: argparse.Namespace) -> int:
    import json

    from adfilter.logs import setup_logging

    setup_logging("WARNING" if args.json else None)
    params = load_params(args.params, profile=args.profile)
    from adfilter.simulate import ScenarioError
    from serving.simulate import simulate

    try:
        result = simulate(params, args.scenario, args.n, args.store, seed=args.seed,
                          bundle=args.bundle, url=args.url, batch_size=args.batch_size,
                          feedback_share=args.feedback_share, progress=not args.json)
    except ScenarioError as exc:
        print(f"adfilter simulate: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str) if args.json else json.dumps(result, indent=2, default=str))
    return 0


def _add_simulate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="push scenario traffic through the serving cascade into a "
                       "prediction store")
    p.add_argument("--scenario", required=True,
                   help="stable | new-ad-variant | image-shift (see adfilter.simulate)")
    p.add_argument("--n", type=int, required=True, help="number of posts")
    p.add_argument("--store", default=None, help="prediction store URL (default: serve.store.url)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", default=None, help="model bundle for the in-process cascade "
                   "(default: serve.bundle)")
    p.add_argument("--url", default=None, help="a running server (http://host:port) instead of "
                   "the in-process cascade")
    p.add_argument("--batch-size", type=int, default=None,
                   help="posts per request (default: drift.simulate.batch_size)")
    p.add_argument("--feedback-share", type=float, default=None,
                   help="share of posts labelled via /v1/feedback (default: drift.simulate.feedback_share)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--profile", default=None, help="params profile (default: the selected one)")
    p.set_defaults(func=_cmd_simulate)


# --------------------------------------------------------------------------- registry (register, promote, rollback)


def _registry_setup(args: argparse.Namespace):
    import os

    from adfilter.logs import setup_logging

    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return load_params(args.params)


def _cmd_register(args: argparse.Namespace) -> int:
    params = _registry_setup(args)
    from tasks.register import run_stage

    run_stage(params, promote_now=args.promote)
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    import json

    params = _registry_setup(args)
    from tasks.register import RegisterError, format_decision, promote

    try:
        report = promote(params, args.version)
    except RegisterError as exc:
        print(f"adfilter promote: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str) if args.json else format_decision(report))
    return 0 if report["decision"] in ("promoted", "kept") or not args.strict else 1


def _cmd_rollback(args: argparse.Namespace) -> int:
    params = _registry_setup(args)
    from tasks.register import RegisterError, rollback

    try:
        done = rollback(params, args.reason)
    except RegisterError as exc:
        print(f"adfilter rollback: {exc}", file=sys.stderr)
        return 2
    print(f"{done['model']}: champion moved back from version {done['from']} to {done['to']} "
          f"({done['reason'] or 'no reason given'})")
    return 0


def _add_registry_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("register", help="register artifacts/export as the 'challenger' version of "
                       "ad-filter (the register stage)")
    p.add_argument("--promote", action=argparse.BooleanOptionalAction, default=None,
                   help="run the promotion gate afterwards (default: register.promote)")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("promote", help="run the promotion gate on the challenger (or --version) and "
                       "move 'champion' to it if it passes")
    p.add_argument("--version", default=None, help="registered version to judge (default: the challenger)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the gate refuses")
    p.add_argument("--json", action="store_true", help="print the whole gate report as JSON")
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("rollback", help="move 'champion' back to the previous champion")
    p.add_argument("--reason", default="", help="recorded on the registry with the rollback")
    p.set_defaults(func=_cmd_rollback)


# --------------------------------------------------------------------------- parser


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

    _add_serve_parser(sub)
    _add_drift_parser(sub)
    _add_simulate_parser(sub)
    _add_registry_parsers(sub)
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
