"""Run a command so that it, and all it starts, dies with the process that started it.

``python flows/guard.py PARENT_PID GRACE_S -- CMD...`` is how the flows start ``dvc``: the
flow makes this guard the leader of a new process group, the guard asks Linux to send it
SIGTERM when its parent dies (``PR_SET_PDEATHSIG``) and runs CMD inside that group. On
SIGTERM (the parent died, was killed with SIGKILL, or timed the stage out) the guard passes
SIGTERM to the whole group, so DVC and the stage under it unwind and remove their partial
outputs, and SIGKILLs whatever is left after GRACE_S. It is run as a file, importing only
the standard library, so it starts in milliseconds from any working directory.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

#: prctl(2) option: the signal this process gets when its parent thread exits.
PR_SET_PDEATHSIG = 1


class _Stop(BaseException):
    """SIGTERM reached the guard."""


def _stop(signum: int, frame: object) -> None:
    # ignore any further SIGTERM before unwinding: a second one raised inside the
    # ``except _Stop`` below would end the guard before it ends the group
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Stop


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits; False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def _end_group(child: subprocess.Popen | None, grace_s: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    if child is not None:
        try:
            child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    os.killpg(0, signal.SIGKILL)  # whatever ignored SIGTERM; the guard goes with it


def main(argv: list[str]) -> int:
    """Run ``argv`` = [parent pid, grace seconds, "--", command...]; the command's status."""
    parent, grace_s, sep, *cmd = argv
    if sep != "--" or not cmd:
        print("usage: guard.py PARENT_PID GRACE_S -- CMD...", file=sys.stderr)
        return 2
    if os.getpgrp() != os.getpid():
        os.setpgid(0, 0)  # never signal the caller's own group
    signal.signal(signal.SIGTERM, _stop)
    child = None
    try:
        set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != int(parent):  # the parent died before prctl took effect
            raise _Stop
        child = subprocess.Popen(cmd)
        status = child.wait()
        return 128 - status if status < 0 else status
    except _Stop:
        _end_group(child, float(grace_s))
        return 128 + signal.SIGTERM
    except BaseException:  # never leave a started command running behind an unexpected error
        if child is not None:
            _end_group(child, float(grace_s))
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
