"""Command line for the Prefect flows: ``python -m flows {run,serve,sweep,promote,alerts}``.

    python -m flows run                      # reproduce the pipeline once, as a Prefect flow run
    python -m flows serve --cron "0 3 * * *" # serve it on a schedule (runs never overlap)
    python -m flows sweep -S train.lr=0.01,0.003 -S train.epochs=5,10 --jobs 2
    python -m flows promote [VERSION] --stage prod  # registry stage (docs/unattended.md)
    python -m flows alerts --webhook URL     # failed runs / gates / regressions -> webhook
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml

PROG = "convflow.flow"
#: Exit statuses: a user mistake (as the stages), any other failure, a lost Prefect server.
USER_ERROR, FAILED, SERVER_LOST = 2, 1, 75


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported as the stages do: one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message} (see python -m flows --help)", file=sys.stderr)
        sys.exit(USER_ERROR)


def _grid(items: list[str]) -> dict[str, list]:
    """``-S key=v1,v2`` options as a sweep grid {key: [v1, v2]}; values parsed as YAML."""
    from stages.errors import UserError

    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UserError(f"-S {item!r}: expected key=value[,value...]")
        try:
            grid[key] = [yaml.safe_load(v) for v in values.split(",")]
        except yaml.YAMLError as exc:
            raise UserError(f"-S {item!r}: not a YAML value: {exc}".splitlines()[0]) from None
    return grid


def check_points(root: Path, grid: dict[str, list]) -> None:
    """Refuse a sweep point the params schema rejects, before any experiment starts.

    Only for a checkout whose own params.yaml follows convflow's schema.
    """
    from flows.sweep import expand_grid
    from stages.errors import UserError
    from stages.params import parse_params

    try:
        base = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
        parse_params(base)
    except (OSError, yaml.YAMLError, UserError):
        return  # not convflow's params: the experiments' own stages will judge
    for point in expand_grid(grid):
        raw = copy.deepcopy(base)
        for key, value in point.items():
            *groups, leaf = key.split(".")
            node = raw
            for depth, group in enumerate(groups, 1):
                node = node.setdefault(group, {})
                if not isinstance(node, dict):  # a value, not a group of keys
                    raise UserError(f"-S {key}={value}: '{'.'.join(groups[:depth])}' is a "
                                    "value, not a group of keys")
            node[leaf] = value
        source = "-S " + " -S ".join(f"{k}={v}" for k, v in point.items())
        try:
            parse_params(raw, source)
        except UserError as exc:
            raise UserError(" ".join(str(exc).split())) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m flows`` argument parser."""
    parser = _Parser(prog="python -m flows", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

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

    # the model registry and alerts (docs/unattended.md)
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


def _check_numbers(args: argparse.Namespace) -> None:
    from flows.slots import check_settings
    from stages.errors import UserError

    check_settings()  # the CONVFLOW_* seconds a run's slot reads
    for name in ("timeout", "interval"):
        value = getattr(args, name, None)
        if value is not None and not 0 < value < float("inf"):
            raise UserError(f"--{name} must be a positive number of seconds (got {value})")
    if getattr(args, "retries", 0) < 0:
        raise UserError(f"--retries must be 0 or more (got {args.retries})")
    if getattr(args, "jobs", 1) < 1:
        raise UserError(f"--jobs must be 1 or more (got {args.jobs})")
    if getattr(args, "promote", None) and not getattr(args, "commit", False):
        # only a committed run is registered, so there would be no version to promote
        raise UserError(f"--promote {args.promote} needs --commit: only a committed run "
                        "registers a model version")


class _ConsoleFilter(logging.Filter):
    """Prefect's console without tracebacks or repeats of the error the CLI prints once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(("prefect.events", "prefect._internal")):
            return False  # background services' complaints about a lost server
        engine = record.name.startswith(("prefect.flow_runs", "prefect.task_runs"))
        if engine and record.levelno >= logging.ERROR:
            return False
        message = record.getMessage()
        return not (engine and message.startswith("Finished in state")
                    and "Completed" not in message)


class _NoTraceback(logging.Formatter):
    """Formats with ``inner`` but leaves out tracebacks (the API log keeps them)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def quiet_console() -> None:
    """Keep Prefect's progress lines on stderr, but no tracebacks and no repeated errors."""
    loggers = [logging.getLogger()] + [logging.getLogger(name)
                                       for name in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            stream = getattr(handler, "stream", None)
            if stream in (sys.stderr, sys.stdout) and not isinstance(handler.formatter,
                                                                     _NoTraceback):
                handler.addFilter(_ConsoleFilter())
                handler.setFormatter(_NoTraceback(handler.formatter))


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen flow; a user mistake is one line, exit 2."""
    from stages.errors import UserError

    args = build_parser().parse_args(argv)
    # Set before Prefect reads its settings. A lost server fails a run within a minute
    # (~6 s of retries per request, not Prefect's ~60 s), and a run whose heartbeats stop
    # is marked CRASHED about 70 s later (Prefect's default period is 180 s).
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "2")
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    logging.raiseExceptions = False  # a log line the lost server cannot take is dropped
    try:
        return _dispatch(args)
    except UserError as exc:
        return _fail(str(exc), USER_ERROR)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:
        from flows.dvc_adapter import DvcError
        from flows.runner import ServerLost, StageFailed, server_lost

        if isinstance(exc, StageFailed):
            return _fail(str(exc), USER_ERROR if exc.returncode == USER_ERROR else FAILED)
        if isinstance(exc, DvcError):
            return _fail(f"dvc: {exc}", USER_ERROR)
        if isinstance(exc, ServerLost):
            return _fail(str(exc), SERVER_LOST)
        lost = server_lost(exc)
        if lost:
            return _fail(lost, SERVER_LOST)
        bad = _bad_prefect_setting(exc)
        if bad:
            return _fail(bad, USER_ERROR)
        raise


def _bad_prefect_setting(exc: Exception) -> str | None:
    """A Prefect setting (environment or profile) its schema refuses, named in one line."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError) or not exc.title.endswith("Settings"):
        return None
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    return (f"Prefect setting {exc.title}.{field} = {str(first.get('input'))[:40]!r}: "
            f"{first['msg']} (see the PREFECT_* environment and `prefect config view`)")


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def _dispatch(args: argparse.Namespace) -> int:
    from stages.paths import find_root

    _check_numbers(args)
    if args.command == "alerts":  # needs no checkout
        return _alerts(args)
    # a wrong --root is a one-line error before Prefect starts (or starts a server)
    args.root = str(find_root(args.root))
    return {"sweep": _sweep, "promote": _promote, "serve": _serve}.get(args.command, _run)(args)


def _alerts(args: argparse.Namespace) -> int:
    from flows.alerts import setup_automation

    automation = setup_automation(webhook=args.webhook, block=args.block)
    print(f"automation '{automation.name}' ({automation.id}) sends convflow alerts")
    return 0


def _watched(flow_fn: Any, **kwargs: Any) -> Any:
    """Run ``flow_fn`` tagged for the crash automation, with a quiet console."""
    from prefect import tags

    from flows.crash import WATCHED_TAG, end_runs_without_waiting, ensure_crash_detection

    quiet_console()
    ensure_crash_detection()
    end_runs_without_waiting()
    with tags(WATCHED_TAG):
        return flow_fn(**kwargs)


def _sweep(args: argparse.Namespace) -> int:
    grid = _grid(args.grid)
    check_points(Path(args.root), grid)
    from flows.sweep import sweep

    rows = _watched(sweep, grid=grid, root=args.root, max_parallel=args.jobs,
                    timeout_s=args.timeout)
    _print_sweep(grid, rows)
    return 0


def _promote(args: argparse.Namespace) -> int:
    from flows.registry import promote

    print(f"{promote(args.root, args.version, args.stage, push=args.push)} -> {args.stage}")
    return 0


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"timeout_s": args.timeout, "retries": args.retries, "push": args.push,
            "commit": args.commit, "promote": args.promote}


def _serve(args: argparse.Namespace) -> int:
    from flows.crash import ensure_crash_detection
    from flows.serve import serve_pipeline

    quiet_console()
    ensure_crash_detection()
    serve_pipeline(args.root, cron=args.cron, interval=args.interval,
                   collision=args.collision, name=args.name, parameters=_run_options(args))
    return 0


def _run(args: argparse.Namespace) -> int:
    from flows.pipeline import pipeline

    summary = _watched(pipeline, root=args.root, force=args.force, **_run_options(args))
    for row in summary:
        print(f"{row['stage']:<12} {row['status']:<24} {row['seconds']:.2f} s")
    return 0


def _print_sweep(grid: dict[str, list], rows: list[dict[str, Any]]) -> None:
    for row in sorted(rows, key=lambda r: r["experiment"]):
        swept = [f"{k}={row.get(f'params.yaml:{k}')}" for k in grid]
        metrics = [f"{key.split(':', 1)[1]}={value:.4g}" for key, value in row.items()
                   if ":" in key and not key.startswith("params.yaml:")
                   and isinstance(value, float)]
        print(row["experiment"], row["rev"], *swept, *metrics)
    print("compare: dvc exp show; keep one: dvc exp apply <name>")


if __name__ == "__main__":
    sys.exit(main())
