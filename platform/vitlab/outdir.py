"""Output directories on a local disk (a prepared dataset, an ONNX export): built in a hidden sibling and put
in place whole, so that OUT is always either the old output or the new one, never a mix and never missing.

Names beside OUT that this module owns, and nothing else is ever removed:
``.OUT.partial-PID-XXXXXXXX`` (a build in progress by process PID) and ``.OUT.old-PID-XXXXXXXX`` (an old
output moved aside, only where the atomic exchange is unavailable).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _siblings(final: Path, kind: str) -> list[Path]:
    prefix = f".{final.name}.{kind}-"
    return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefix)) if final.parent.is_dir() else []


def _owner_alive(path: Path) -> bool:
    pid = path.name.rsplit("-", 2)[-2]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def recover(final: Path) -> None:
    """Finish what an interrupted run of this module left: an old output moved aside while OUT is missing
    goes back (the process died between its two renames); old copies and the partial builds of processes
    that are gone are removed. A build by a live process is left alone."""
    olds = _siblings(final, "old")
    if olds and not final.exists():
        os.rename(olds[-1], final)
        log.warning("%s: restored the previous output from %s (an earlier replace was interrupted)",
                    final, olds[-1].name)
        olds = olds[:-1]
    for stale in [*olds, *(p for p in _siblings(final, "partial") if not _owner_alive(p))]:
        log.info("removing %s (left by an interrupted run)", stale)
        shutil.rmtree(stale, ignore_errors=True)


def staging(final: Path) -> Path:
    """A new, empty hidden sibling of ``final`` to build it in."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def swap(tmp: Path, final: Path) -> None:
    """Put the finished build ``tmp`` at ``final``. An old ``final`` is exchanged with it in one
    renameat2(RENAME_EXCHANGE) where the kernel and filesystem have it; elsewhere it is moved aside first,
    and ``recover`` puts it back if the process dies between the two renames."""
    if not final.exists():
        os.rename(tmp, final)
        return
    if _exchange(tmp, final):
        shutil.rmtree(tmp)  # it now holds the old output
        return
    old = final.parent / f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2, glibc 2.28+); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
