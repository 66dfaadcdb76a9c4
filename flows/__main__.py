"""Command line for the Prefect flows: ``python -m flows {run,serve,sweep} ...``.

    python -m flows run                      # reproduce the pipeline once, as a Prefect flow run
    python -m flows serve --cron "0 3 * * *" # serve it on a schedule (runs never overlap)
    python -m flows sweep -S train.lr=0.01,0.003 -S train.epochs=5,10 --jobs 2
    python -m flows promote [VERSION] --stage prod  # registry stage (docs/unattended.md)
    python -m flows alerts --webhook URL     # failed runs / gates / regressions -> webhook
"""

from __future__ import annotations

import argparse
import sys

import yaml


def _grid(items: list[str]) -> dict[str, list]:
    """``-S key=v1,v2`` options as a sweep grid {key: [v1, v2]}; values parsed as YAML."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SystemExit(f"-S {item!r}: expected key=value[,value...]")
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m flows`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m flows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="reproduce the pipeline once as a Prefect flow run")
    serve = sub.add_parser("serve", help="serve the pipeline flow on a schedule")
    for p in (run, serve):
        p.add_argument("--root", help="repository root (default: found from the cwd)")
        p.add_argument("--timeout", type=float, default=None,
                       help="seconds each stage may run before its process group is killed")
        p.add_argument("--retries", type=int, default=2,
                       help="retries of a transient failure (a download), with backoff")
        p.add_argument("--push", action="store_true", help="dvc push at the end")
        p.add_argument("--commit", action="store_true",
                       help="git commit dvc.lock, params and metrics at the end")
        p.add_argument("--promote", metavar="STAGE", default=None,
                       help="with --commit: assign this registry stage (e.g. prod) to the "
                            "version the run registers")
    run.add_argument("--force", action="store_true", help="run every stage, changed or not")
    when = serve.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron schedule, e.g. "0 3 * * *"')
    when.add_argument("--interval", type=float, help="seconds between runs")
    serve.add_argument("--collision", choices=["enqueue", "cancel"], default="enqueue",
                       help="a run that would overlap the running one waits (enqueue, "
                            "the default) or is cancelled (cancel)")
    serve.add_argument("--name", default="convflow", help="deployment name")

    sweep = sub.add_parser("sweep", help="run a grid of overrides as DVC experiments")
    sweep.add_argument("-S", "--set", dest="grid", action="append", required=True,
                       metavar="KEY=V1,V2", help="a param and the values to sweep")
    sweep.add_argument("--jobs", type=int, default=2, help="experiments run in parallel")
    sweep.add_argument("--root", help="repository root (default: found from the cwd)")
    sweep.add_argument("--timeout", type=float, default=None, help="seconds per experiment")

    # guardrails: the model registry and alerts (docs/unattended.md)
    promote = sub.add_parser("promote", help="assign a registry stage to a model version")
    promote.add_argument("version", nargs="?", help="e.g. v0.0.3 (default: latest registered)")
    promote.add_argument("--stage", default="prod", help="registry stage (default: prod)")
    promote.add_argument("--push", action="store_true", help="push the stage tag to origin")
    promote.add_argument("--root", help="repository root (default: found from the cwd)")
    alerts = sub.add_parser("alerts", help="send convflow alert events to a webhook or block")
    target = alerts.add_mutually_exclusive_group(required=True)
    target.add_argument("--webhook", help="URL receiving Slack-compatible JSON {\"text\": ...}")
    target.add_argument("--block", help="a saved notification block, e.g. sendgrid-email/ops")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen flow; a user mistake is one line, exit 2."""
    from stages.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as exc:
        print(f"convflow.flow: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from flows.pipeline import resolve_root

    if args.command == "alerts":
        from flows.alerts import setup_automation

        automation = setup_automation(webhook=args.webhook, block=args.block)
        print(f"automation '{automation.name}' ({automation.id}) sends convflow alerts")
        return 0
    # a wrong --root is a one-line error before Prefect starts (or starts a server)
    args.root = str(resolve_root(args.root))
    if args.command == "sweep":
        from flows.sweep import sweep

        grid = _grid(args.grid)
        rows = sweep(grid, root=args.root, max_parallel=args.jobs, timeout_s=args.timeout)
        for row in sorted(rows, key=lambda r: r["experiment"]):
            swept = [f"{k}={row.get(f'params.yaml:{k}')}" for k in grid]
            metrics = [f"{key.split(':', 1)[1]}={value:.4g}" for key, value in row.items()
                       if ":" in key and not key.startswith("params.yaml:")
                       and isinstance(value, float)]
            print(row["experiment"], row["rev"], *swept, *metrics)
        print("compare: dvc exp show; keep one: dvc exp apply <name>")
        return 0
    if args.command == "promote":
        from flows.registry import promote

        print(f"{promote(args.root, args.version, args.stage, push=args.push)} -> {args.stage}")
        return 0
    options = {"timeout_s": args.timeout, "retries": args.retries, "push": args.push,
               "commit": args.commit, "promote": args.promote}
    if args.command == "serve":
        from flows.serve import serve_pipeline

        serve_pipeline(args.root, cron=args.cron, interval=args.interval,
                       collision=args.collision, name=args.name, parameters=options)
        return 0
    from flows.pipeline import StageFailed, pipeline

    try:
        summary = pipeline(root=args.root, force=args.force, **options)
    except StageFailed as exc:
        print(f"convflow.flow: error: {exc}", file=sys.stderr)
        return 1
    for row in summary:
        print(f"{row['stage']:<12} {row['status']:<24} {row['seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
