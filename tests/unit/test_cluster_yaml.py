"""cluster.yaml: valid for Ray's own cluster launcher (offline), secure by default (token auth, dashboard on
127.0.0.1, MLflow on the head's private address), and every vitlab command it runs or tells you to run exists."""

from __future__ import annotations

import copy
import re
import shlex
import sys

import pytest
import ray
import yaml

from tests.support import ROOT
from vitlab.cli import build_parser
from vitlab.commands import check_submitted

CLUSTER = ROOT / "cluster.yaml"
SHELL_OPERATORS = {">", ">>", "|", "||", "&&", ";", "&", "2>&1"}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def prepared(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(cfg))
    validate_config(cfg)
    return cfg


def all_commands(cfg: dict) -> list[str]:
    out = []
    for key, value in cfg.items():
        if key.endswith("_commands"):
            out += value
    for node_type in cfg["available_node_types"].values():
        for key, value in node_type.items():
            if key.endswith("_commands"):
                out += value
    return out


def test_valid_for_the_ray_cluster_launcher(raw):
    cfg = prepared(raw)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must schedule no training or decoding"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    instance_types = {t["node_config"]["InstanceType"] for t in workers.values()}
    assert {"g5.12xlarge", "p4d.24xlarge"} <= instance_types  # 4x A10G, 8x A100
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
               for t in workers.values())
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        disk = t["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
        if t["node_config"]["InstanceType"].startswith(("g", "p")):
            assert disk >= 500, f"{name}: room for a local shard cache and object spilling"


def test_launcher_validation_has_teeth(raw):
    """The same validation rejects a misspelt key and a head type that does not exist."""
    import jsonschema

    typo = copy.deepcopy(raw)
    typo["available_node_types"]["gpu-4x-a10g"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        prepared(typo)
    no_head = copy.deepcopy(raw)
    no_head["head_node_type"] = "headd"
    with pytest.raises(ValueError, match="head_node_type"):
        prepared(no_head)


def test_image_matches_the_installed_ray_and_python(raw):
    tag = f"{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    assert tag == "2.60.0-py311"
    for key in ("head_image", "worker_image"):
        assert raw["docker"][key].startswith(f"rayproject/ray:{tag}-"), raw["docker"][key]
    assert raw["docker"]["worker_image"].endswith("-gpu")


def test_token_auth_private_mlflow_and_worker_environment(raw):
    head = " ".join(raw["head_start_ray_commands"])
    worker = " ".join(raw["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in " ".join(all_commands(raw))
    mlflow = next(c for c in raw["head_start_ray_commands"] if "nohup mlflow server" in c)
    # the head's private address from the instance metadata (hostname -I can list docker0 first)
    assert "169.254.169.254/latest/meta-data/local-ipv4" in mlflow and "--host $HEAD_IP" in mlflow
    assert "hostname -I" not in " ".join(all_commands(raw))
    assert "--artifacts-destination s3://" in mlflow and "--backend-store-uri sqlite:///" in mlflow
    assert re.search(r"MLFLOW_TRACKING_URI=http://\$RAY_HEAD_IP:5000", worker)
    # basic-auth on; the password comes from the mounted file, on the head and on every worker
    password = "$(cat /home/ray/.vitlab/mlflow_admin_password)"
    assert "--app-name basic-auth" in mlflow and f"MLFLOW_AUTH_ADMIN_PASSWORD={password}" in mlflow
    for env in (head, worker):
        assert f"MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD={password}" in env
    assert raw["file_mounts"]["/home/ray/.vitlab/mlflow_admin_password"] == "~/.vitlab/mlflow_admin_password"
    assert re.search(r"VITLAB_STORAGE_PATH=s3://\S+", worker) and re.search(r"VITLAB_STORAGE_PATH=s3://\S+", head)
    # the token travels to every node; the repo is installed from where it is mounted
    assert raw["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    repo = next(remote for remote, local in raw["file_mounts"].items() if local == ".")
    assert any(c.startswith(f"pip install --quiet -e {repo}") for c in raw["setup_commands"])


def test_every_node_type_says_what_it_costs():
    lines = CLUSTER.read_text().splitlines()
    start = lines.index("available_node_types:")
    for i, line in enumerate(lines[start + 1:], start + 1):
        m = re.fullmatch(r"  ([\w-]+):", line)
        if not m:
            if line and not line.startswith((" ", "#")):
                break  # end of the section
            continue
        j, comment = i - 1, []
        while lines[j].lstrip().startswith("#"):
            comment.append(lines[j])
            j -= 1
        price = re.search(r"\$\d+(\.\d+)?(-\d+(\.\d+)?)?/h", " ".join(comment))
        assert price, f"{m.group(1)}: no price per hour in the comment above it"


def _vitlab_invocations(cfg: dict) -> tuple[list[list[str]], list[list[str]]]:
    """(full command lines, bare subcommand mentions): from the commands the launcher runs, from comment lines
    that are a command (`#   vitlab ...`), and from `vitlab ...` quoted in comments."""
    full, mentions = [], []
    for command in all_commands(cfg):
        for m in re.finditer(r"(?:^|(?<=[\s;&|(]))vitlab[ \t]+(.*)", command):
            full.append(m.group(1))
    for line in CLUSTER.read_text().splitlines():
        text = line.strip()
        if not text.startswith("#"):
            continue
        body = text.lstrip("#").strip()
        if body.startswith("vitlab "):
            full.append(body[len("vitlab "):].split("  #")[0])
        mentions += re.findall(r"`vitlab ([^`]+)`", body)
    cut = []
    for text in full:
        argv = []
        for word in shlex.split(text):
            if word in SHELL_OPERATORS:
                break
            argv.append(word)
        cut.append(argv)
    return cut, [shlex.split(m) for m in mentions]


def test_every_vitlab_command_exists(raw):
    full, mentions = _vitlab_invocations(raw)
    assert any(argv[:1] == ["--help"] for argv in full), full  # the setup check
    assert any(argv[:1] == ["submit"] for argv in full), full
    parser = build_parser()
    for argv in full:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            assert e.code == 0 and argv == ["--help"], f"`vitlab {shlex.join(argv)}` does not parse"
            continue
        if args.command == "submit":
            check_submitted(parser, args.vitlab_args, ROOT)  # the job it submits parses too, and its config validates
    commands = {name: sub for action in parser._subparsers._group_actions for name, sub in action.choices.items()}
    for argv in mentions:
        sub = commands.get(argv[0])
        assert sub is not None, f"`vitlab {argv[0]}` is not a vitlab command"
        nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
        if nested and len(argv) > 1:
            assert argv[1] in nested[0].choices, f"`vitlab {' '.join(argv[:2])}` is not a vitlab command"
