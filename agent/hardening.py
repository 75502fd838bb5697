"""Process hardening at start-up: no core dumps, no ptrace by peers."""

from __future__ import annotations

import ctypes
import logging
import resource
import sys

log = logging.getLogger(__name__)
_PR_SET_DUMPABLE = 4


def harden_process() -> None:
    """Disable core dumps and make the process non-dumpable (Linux).

    A core file or a same-uid debugger would expose every cached secret and
    unwrapped data key. Best effort: failures are logged, not fatal.
    """
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as exc:
        log.warning("could not disable core dumps: %s", exc)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
                log.warning("prctl(PR_SET_DUMPABLE, 0) failed: errno %d", ctypes.get_errno())
        except OSError as exc:
            log.warning("could not mark the process non-dumpable: %s", exc)
