"""User-facing errors and the thin command-line edge every stage shares."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

#: Exit status of a stage stopped by a user mistake (bad params, bad input file).
USER_ERROR_EXIT = 2
#: Exit status of a failure that may pass on a later try (EX_TEMPFAIL): the flow retries it.
TEMPFAIL_EXIT = 75


class UserError(Exception):
    """A mistake the user can fix: printed as one clear message, never as a traceback."""

    exit_status = USER_ERROR_EXIT


class TransientError(UserError):
    """A clear message like any user error, for a failure that a retry may not meet
    (network, server); the stage exits with :data:`TEMPFAIL_EXIT` so orchestrators retry."""

    exit_status = TEMPFAIL_EXIT


def setup_logging(verbose: bool | None = None) -> None:
    """Log to stderr as ``convflow.<stage>: message``; CONVFLOW_DEBUG=1 shows debug lines."""
    if verbose is None:
        verbose = os.environ.get("CONVFLOW_DEBUG", "") not in ("", "0")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def run_cli(main: Callable[[Sequence[str] | None], object],
            argv: Sequence[str] | None = None) -> None:
    """Run a stage's ``main``; a :class:`UserError` becomes one log line and its exit status.

    The line reads ``convflow.<stage>: error: <message>`` (what the Prefect flow reports).
    Anything else is a bug and keeps its traceback.
    """
    setup_logging()
    module = main.__module__
    if module == "__main__":  # `python -m stages.train`: the real name is on the module spec
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else "stage"
    stage = module.rsplit(".", 1)[-1]
    log = logging.getLogger(f"convflow.{stage}")
    # SIGTERM (a Prefect timeout, `kill`) unwinds like Ctrl-C, so atomic outputs clean up
    # their temp folders instead of leaving them beside the real ones
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main(argv)
    except UserError as err:
        log.error("error: %s", err)
        sys.exit(err.exit_status)
    except MemoryError:
        # not retryable (a retry needs the same memory), so the user-error status; the
        # inputs are capped (docs/threat-model.md), so this is a run sized beyond the machine
        log.error("error: out of memory; lower the sizes in params.yaml (data.synthetic.*, "
                  "train.batch_size, evaluate.batch_size) or run where there is more memory")
        sys.exit(USER_ERROR_EXIT)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)
    except _Terminated:
        log.error("terminated")
        sys.exit(143)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so ``finally`` and cleanup blocks run."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated
