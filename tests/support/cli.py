"""Run the vitlab CLI in this process and collect what it printed: how both tiers check errors and output."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

from vitlab import cli


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*argv) -> Ran:
    """``vitlab ARGV`` through cli.main, with what it printed on stdout and stderr (log records go to the
    log handlers, not here); argparse's own exits (usage errors) count as exit codes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return Ran(code, out.getvalue(), err.getvalue())


def assert_one_line_error(ran: Ran, message: str, code: int = 2) -> None:
    """A bad input: exit code 2, one line on stderr naming the problem, no traceback."""
    assert ran.returncode == code, (ran.returncode, ran.stderr)
    assert message in ran.stderr, ran.stderr
    assert ran.stderr.strip().count("\n") == 0 and "Traceback" not in ran.stderr, ran.stderr
