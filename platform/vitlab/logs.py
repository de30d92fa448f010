"""What a command shows: vitlab's own lines and errors on the terminal, everything else in a log file.

``setup`` (called by the CLI) sends every log record to the command's log file, and to the terminal only
vitlab's records (INFO and up) and anyone's errors. Ray's, MLflow's and Python's own INFO lines and warnings
(deprecations, "token authentication is enabled") stay in the file. ``route_ray_output`` does the same for the
output of Ray's processes (Train workers, the controller, Ray Data): vitlab's lines there carry
``WORKER_MARK`` (``mark_worker_logging``) and reach the terminal without Ray's prefix; Python tracebacks and
the raylet's and autoscaler's notices (a worker killed for memory, nodes added) reach it in full, but for the
raylet's expected "worker processes have been started" notice; the rest goes to the file only. Information
goes to stdout, warnings and errors to stderr (a bad input's one-line error is then all that stderr holds).
With ``-v`` the terminal shows everything as well.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitlab.redact import RedactFilter, redact

WORKER_MARK = "[vitlab] "
LOG_FILE = "vitlab.log"  # in the run directory of a training or sweep
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
THIRD_PARTY = ("ray", "mlflow", "torch", "alembic", "urllib3", "botocore", "filelock", "py.warnings")
_ray_print: Any = None  # Ray's own printer of its processes' output, kept when route_ray_output replaces it
_TRACEBACK_START = "Traceback (most recent call last):"
_MARKED = re.compile(re.escape(WORKER_MARK) + r"(?P<level>[A-Z]+) (?P<message>.*)")
# The raylet's notice when more worker processes start at once than the node has CPUs: expected, with a span's decode
# actors and val's CPU-less tasks (data/pipeline.py), and no action to take. Kept in the file only.
_RAYLET_FILE_ONLY = re.compile(r".*PYTHON worker processes have been started on node.*startup concurrency.*")


class TerminalFormatter(logging.Formatter):
    """``HH:MM:SS message``; the level is shown only when it is a warning or worse."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname} " if record.levelno >= logging.WARNING else ""
        text = f"{self.formatTime(record, '%H:%M:%S')} {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class TerminalFilter(logging.Filter):
    """vitlab's records, and errors from anyone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "vitlab" or record.name.startswith("vitlab.") or record.levelno >= logging.ERROR


class TerminalHandler(logging.StreamHandler):
    """INFO lines to stdout (what a command reports as it goes), warnings and errors to stderr (so a bad input's
    one-line error is all that stderr holds); to whatever ``sys.stdout``/``sys.stderr`` are when a record comes
    (a test's capture, the CLI runner's buffers)."""

    def __init__(self):
        logging.Handler.__init__(self)
        self._stream = sys.stdout

    @property
    def stream(self):  # type: ignore[override]
        return self._stream

    def emit(self, record: logging.LogRecord) -> None:
        self._stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


@dataclass
class _Routing:
    verbose: bool
    path: Path | None
    terminal: logging.Handler
    file: logging.Handler | None
    lock: threading.Lock
    tracebacks: dict[Any, list[str]]  # (pid, stream) -> the lines of the traceback it is printing
    shown: set[str]  # tracebacks already shown: every worker and the controller report the same error


_routing: _Routing | None = None


def default_log_path(command: str) -> Path:
    """/tmp/vitlab-<command>.log; a private temporary file when that one belongs to someone else."""
    path = Path(tempfile.gettempdir()) / f"vitlab-{command.replace(' ', '-')}.log"
    try:
        path.open("w").close()
        return path
    except OSError:
        fd, name = tempfile.mkstemp(prefix=f"vitlab-{command.replace(' ', '-')}-", suffix=".log")
        os.close(fd)
        return Path(name)


def setup(verbose: bool, path: Path | None) -> None:
    """Route this process's log records: the terminal (information on stdout, warnings and errors on stderr)
    and, when ``path`` is given, the log file.
    Idempotent: a second call (tests run several commands in one process) replaces the first one's handlers."""
    global _routing
    root = logging.getLogger()
    if _routing is not None:
        for handler in (_routing.terminal, _routing.file):
            if handler is not None:
                root.removeHandler(handler)
                handler.close()
    terminal = TerminalHandler()
    terminal.setFormatter(TerminalFormatter())
    terminal.addFilter(RedactFilter())
    if not verbose:
        terminal.addFilter(TerminalFilter())
    file = _file_handler(path, verbose) if path is not None else None
    for handler in (terminal, file):
        if handler is not None:
            root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("vitlab").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # Python warnings (deprecations) are records: in the file, not the terminal
    _routing = _Routing(verbose, path, terminal, file, threading.Lock(), {}, set())
    adopt_third_party_loggers()


def _file_handler(path: Path, verbose: bool) -> logging.Handler:
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)  # Ray Data's loggers emit DEBUG
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.addFilter(RedactFilter())
    return handler


def log_path() -> Path | None:
    return _routing.path if _routing is not None else None


def move_log(path: Path) -> Path:
    """Continue the log in ``path`` (a run's own log file, appended to across restarts), with what was
    written so far; the temporary file is removed."""
    if _routing is None or _routing.file is None or _routing.path == path:
        return path
    old = _routing.path
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.removeHandler(_routing.file)
    _routing.file.close()
    with path.open("a", encoding="utf-8") as out:
        out.write(old.read_text(encoding="utf-8") if old and old.exists() else "")
    if old is not None:
        old.unlink(missing_ok=True)
    file = _file_handler(path, _routing.verbose)
    root.addHandler(file)
    _routing.file, _routing.path = file, path
    return path


def keep_log_in(location: str) -> None:
    """A training's or sweep's log continues in its own directory, when that is local (a URI's stays in /tmp)."""
    if "://" not in location:
        move_log(Path(location) / LOG_FILE)


def adopt_third_party_loggers() -> None:
    """Ray, Ray Data and MLflow give their loggers their own console handlers and stop propagation: take those
    handlers away so their records reach ours (file always, terminal when verbose or an error). Called after
    the imports that configure them; file handlers (Ray's session logs) stay."""
    if _routing is None:
        return
    for name in list(logging.Logger.manager.loggerDict):
        if not any(name == lib or name.startswith(lib + ".") for lib in THIRD_PARTY):
            continue
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if _writes_to_console(handler):
                logger.removeHandler(handler)
        logger.propagate = True


def _writes_to_console(handler: logging.Handler) -> bool:
    """A StreamHandler that is not a file, or any handler whose stream is stdout/stderr (torch's follows the
    current sys.stderr without being a StreamHandler)."""
    if isinstance(handler, logging.FileHandler):
        return False
    if isinstance(handler, logging.StreamHandler):
        return True
    consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return any(getattr(handler, "stream", None) is c for c in consoles)


def import_quietly(libraries: tuple[str, ...]) -> None:
    """Import MLflow and the ``libraries`` ("ray": Ray and Ray Data; "torch") now, so the loggers they set up at
    import are adopted before they say anything; for commands that will use them anyway."""
    import mlflow  # noqa: F401

    if "torch" in libraries:
        import torch  # noqa: F401  (its "torch" loggers: inductor's notes when compiling)
    if "ray" in libraries:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False  # vitlab prints its own progress
    adopt_third_party_loggers()


def route_ray_output() -> None:
    """Replace Ray's printers (after ``ray.init``) with ``_route``: of its processes' output, and of the raylet's
    notices (a worker killed for memory, many workers started), which its error listener prints by calling
    ``ray._private.worker.print_to_stdstream`` itself."""
    global _ray_print
    if _routing is None or _routing.verbose and _routing.file is None:
        return
    import ray._private.worker as ray_worker

    if _ray_print is None:
        _ray_print = ray_worker.print_to_stdstream

    def print_as_ray(data: dict[str, Any]) -> None:
        _ray_print(data, ignore_prefix=False)

    def routed(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        if _routing is None:  # routing undone (tests put it back): Ray's own printer
            print_as_ray(data)
        else:
            _route(data, print_as_ray)

    ray_worker.global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    ray_worker.global_worker_stdstream_dispatcher.add_handler("ray_print_logs", routed)
    ray_worker.print_to_stdstream = routed
    adopt_third_party_loggers()


def _route(data: dict[str, Any], print_as_ray) -> None:
    """Every line to the file; vitlab's marked lines, tracebacks and the raylet's/autoscaler's notices to the
    terminal (everything, when verbose)."""
    assert _routing is not None
    pid, lines = data.get("pid"), data.get("lines", [])
    source = f"{data.get('actor_name') or data.get('task_name') or 'worker'} pid={pid}"
    if pid == "autoscaler":  # its status dump every few seconds: only its events (nodes added, removed)
        from ray._private.worker import filter_autoscaler_events

        lines, source = list(filter_autoscaler_events(lines)), "autoscaler"
    if _routing.file is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with _routing.lock:
            stream = _routing.file.stream  # type: ignore[attr-defined]
            for line in lines:
                stream.write(f"{stamp} ({source}) {redact(line)}\n")
            stream.flush()
    if pid == "autoscaler":
        for line in lines:
            print(f"(autoscaler) {line}", file=sys.stderr, flush=True)
        return
    if pid == "raylet" and not _routing.verbose:
        lines = [line for line in lines if not _RAYLET_FILE_ONLY.fullmatch(line)]
        if lines:
            print_as_ray({**data, "lines": lines})
        return
    if _routing.verbose:
        print_as_ray(data)
        return
    key = (pid, data.get("is_err"))
    for line in lines:
        marked = _MARKED.fullmatch(line)
        if marked:
            level = logging.getLevelName(marked["level"])
            record = logging.LogRecord("vitlab.worker", level if isinstance(level, int) else logging.INFO,
                                       "", 0, marked["message"], None, None)
            _routing.terminal.handle(record)
            continue
        if _TRACEBACK_START in line and key not in _routing.tracebacks:
            _routing.tracebacks[key] = []
        if key in _routing.tracebacks:
            _routing.tracebacks[key].append(redact(line))
            # the exception's own line (not indented, not a chaining note) ends the traceback
            if line and not line[:1].isspace() and _TRACEBACK_START not in line and ":" in line \
                    and not line.startswith(("During handling", "The above exception")):
                _show_traceback(_routing, source, _routing.tracebacks.pop(key))


def _show_traceback(routing: _Routing, source: str, lines: list[str]) -> None:
    text = "\n".join(lines)
    if text in routing.shown:
        print(f"({source}) {lines[-1]}  [traceback as above]", file=sys.stderr, flush=True)
        return
    routing.shown.add(text)
    print("\n".join(f"({source}) {line}" for line in lines), file=sys.stderr, flush=True)


class _MarkedFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return "\n".join(f"{WORKER_MARK}{record.levelname} {line}" for line in text.splitlines())


def mark_worker_logging() -> None:
    """In a Ray process (a Train worker, the controller, a trial): vitlab's records are printed with
    ``WORKER_MARK``, which the driver's ``_route`` shows on the terminal. Idempotent."""
    logger = logging.getLogger("vitlab")
    if any(isinstance(h.formatter, _MarkedFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_MarkedFormatter("%(message)s"))
    handler.addFilter(RedactFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # else Ray's root console handler prints it a second time, unmarked
