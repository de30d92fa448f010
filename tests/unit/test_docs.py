"""Every command the README, the docs and the job and space headers show works as written, at --help level:
each `vitlab` command parses with the CLI's own parser (and its job file and overrides validate, as
`vitlab submit` checks them), each `make` target exists, each `ray` command parses with Ray's own CLI.
Nothing is run."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.support import ROOT
from vitlab.cli import build_parser
from vitlab.commands import check_submitted
from vitlab.config import load_job
from vitlab.tune.space import load_space

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HEADERS = [*sorted((ROOT / "jobs").glob("*.yaml")), *sorted((ROOT / "search_spaces").glob("*.yaml"))]
OPERATORS = ("&&", "||", ";", "|")
ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def code_lines(path) -> list[str]:
    """The shell lines of a markdown file's ```bash blocks (continuations joined), or a YAML file's leading
    comment lines that are commands."""
    text = path.read_text()
    if path.suffix == ".yaml":
        # "# vitlab train jobs/x.yaml          (what it is)": the command, then two or more spaces and prose
        return [re.split(r"\s{2,}", line.lstrip("# "))[0] for line in text.splitlines()
                if line.startswith("#") and line.lstrip("# ").startswith("vitlab ")]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, without comments and leading VAR=value assignments."""
    if "$(" in line:
        return []  # command substitution: a line about other tools (ssh tunnels)
    out, current = [], []
    for word in shlex.split(line, comments=True):
        if word in OPERATORS:
            out.append(current)
            current = []
        elif word.endswith(";"):
            current.append(word[:-1])
            out.append(current)
            current = []
        else:
            current.append(word)
    out.append(current)
    return [[w for i, w in enumerate(c) if not (ENV.match(w) and all(ENV.match(v) for v in c[:i + 1]))]
            for c in out if c]


ALL = [(f"{path.relative_to(ROOT)}: {line}", cmd) for path in [*DOCS, *HEADERS] for line in code_lines(path)
       for cmd in commands(line)]


def check_vitlab(argv: list[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 on anything it does not know
    if args.command == "submit":
        check_submitted(parser, args.vitlab_args, ROOT)
        return
    job = getattr(args, "job", None)
    if isinstance(job, str) and job.startswith("jobs/"):
        load_job(ROOT / job, args.overrides)
    if getattr(args, "space", None):
        load_space(ROOT / args.space, args.num_samples)


def check_ray(argv: list[str]) -> None:
    from ray.scripts.scripts import cli

    group, name, rest = cli, "ray", argv
    while hasattr(group, "resolve_command"):
        ctx = group.make_context(name, list(rest), resilient_parsing=True)
        name, group, rest = group.resolve_command(ctx, rest)
    group.make_context(name, list(rest))  # click raises UsageError on an unknown option or a missing argument
    if name == "submit" and "--" in argv:
        check_vitlab(argv[argv.index("--") + 2:])  # the entrypoint: vitlab ...


def test_the_docs_show_commands():
    names = {cmd[0] for _, cmd in ALL}
    assert {"vitlab", "make", "ray"} <= names
    assert sum(cmd[0] == "vitlab" for _, cmd in ALL) >= 40


@pytest.mark.parametrize("where, argv", ALL, ids=[w[:90] for w, _ in ALL])
def test_each_command_works_as_written(where, argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    if argv[0] == "vitlab":
        check_vitlab(argv[1:])
    elif argv[0] == "make":
        targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
        assert set(argv[1:]) <= targets, f"{where}: no such make target"
    elif argv[0] == "ray":
        check_ray(argv[1:])
