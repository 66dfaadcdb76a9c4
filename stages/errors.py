"""User-facing errors and the thin command-line edge every stage shares."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

log = logging.getLogger("convflow")

#: Exit status of a stage stopped by a user mistake (bad params, bad input file).
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A mistake the user can fix: printed as one clear message, never as a traceback."""


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


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a stage's ``main`` and turn a :class:`UserError` into a message and exit status 2.

    Anything else is a bug and keeps its traceback.
    """
    setup_logging()
    try:
        main(argv)
    except UserError as err:
        log.error("error: %s", err)
        sys.exit(USER_ERROR_EXIT)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)
