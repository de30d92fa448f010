"""Names that become one path component (run.name, class folders, wnids): one check, so that no name read
from a file or a command line can point outside the folder it is joined to."""

from __future__ import annotations

import re

from vitlab.errors import UserError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
RULE = "expected one path component: no '/' or '\\', not '.' or '..', no control characters"


def is_safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\") \
        and not _CONTROL.search(name)


def check_name(name: str, where: str) -> str:
    """``name`` unchanged, or a UserError that names ``where`` it was found and the bad entry."""
    if not is_safe_name(name):
        raise UserError(f"{where}: bad name {name!r} ({RULE})")
    return name
