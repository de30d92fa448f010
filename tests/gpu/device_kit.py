"""The wheel kit that lets the gpu tier run on the lent nvidia-h200 machine, which is bare and has no network.

Its python3 (3.12, /opt/torch/.venv) already holds torch, torchvision, timm, numpy, pandas, pyarrow, aiohttp,
grpcio, protobuf, pytest, ... (/work/.library/device/KINDS.md lists them). What vitlab needs beyond them travels as
wheels in .whl/ (git-ignored; the device call names it in `carry`), and tests/gpu/device_run.sh installs them with
--no-deps into /tmp/site. The whole tree that travels must stay under 64 MiB, so the Ray wheel is stripped.

    .venv/bin/python tests/gpu/device_kit.py            # here: download, strip, print the sizes
    python3 tests/gpu/device_kit.py --check             # there (device_run.sh): what the kit needs that is missing
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / ".whl"
FALLBACK = KIT / "fallback"  # newer copies of image packages, installed there only where the image's is too old
LIMIT = 64 * 2**20

# What the image lacks, by who needs it: the closure of ray[default,data,train,tune], mlflow-skinny, SQLAlchemy and
# alembic (MLflow's sqlite store) and pydantic, less the image's packages. Nothing the image has is here: a second
# copy in /tmp/site would shadow the image's own, built for its torch. Left out on purpose: py-spy and virtualenv
# (Ray's on-demand profiler and its virtualenv/pip runtime envs, 8.7 MB, unused here), mlflow-tracing (every file of
# it is in mlflow-skinny, byte for byte) and the full mlflow (mlflow-skinny plus 27 MB of the UI's JavaScript).
KIT_NAMES = [
    "ray", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "tensorboardX",  # Core, Tune, Train
    "aiohttp-cors", "colorful", "opencensus", "opencensus-context", "google-api-core", "googleapis-common-protos",
    "proto-plus", "google-auth", "pyasn1-modules", "pyasn1", "cryptography", "cffi", "pycparser", "smart-open",
    "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-proto", "opentelemetry-exporter-prometheus",
    "opentelemetry-semantic-conventions", "importlib-metadata",  # ray[default]: the dashboard, job API, metrics
    "pydantic", "pydantic-core", "annotated-types", "typing-inspection",  # vitlab.config, the dashboard
    "mlflow-skinny", "cachetools", "databricks-sdk", "fastapi", "starlette", "uvicorn", "gitpython", "gitdb", "smmap",
    "python-dotenv", "sqlparse", "sqlalchemy", "alembic", "mako",  # MLflow: client, sqlite store, model logging
]
PURE = {"sqlalchemy"}  # its py3-none-any wheel: 2.1 MB against 4.8, only slower
LEFT_OUT = {"py-spy", "virtualenv", "mlflow-tracing"}
FALLBACK_NAMES = ["typing-extensions"]  # pydantic 2.14 needs >= 4.16; the image's version was never read

# Dropped from the Ray wheel: Java (32 MB of jars), RLlib, Serve and Ray LLM, none of which vitlab imports, and the
# dashboard UI's source maps (the UI still loads; the dashboard must find client/build or it will not start).
RAY_DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/")
# Ray's three big binaries ship their symbol tables (.symtab): `strip --strip-unneeded` takes 4.5 MB off the kit and
# only costs symbol names in a crash's C++ backtrace (the dynamic symbols they link with stay).
RAY_STRIP = ("ray/_raylet.so", "ray/core/src/ray/gcs/gcs_server", "ray/core/src/ray/raylet/raylet")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(names: list[str], dest: Path, pure: bool = False) -> None:
    """``names`` at this checkout's .venv's versions (what CI tests), as wheels for the device's CPython 3.12."""
    from importlib.metadata import distributions

    sites = [str(p) for p in (ROOT / ".venv" / "lib").glob("python3*/site-packages")]
    versions = {norm(d.metadata["Name"]): d.version for d in distributions(path=sites)}
    if missing := [n for n in names if norm(n) not in versions]:
        sys.exit(f"not in .venv (run `make install` first): {' '.join(missing)}")
    # pip matches each manylinux_2_N tag exactly: name every N the device's glibc (Ubuntu 24.04's 2.39) can load
    target = ["--implementation", "py", "--abi", "none", "--platform", "any"] if pure else [
        "--implementation", "cp", "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64",
        *(a for n in range(17, 40) for a in ("--platform", f"manylinux_2_{n}_x86_64"))]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", *target, "-d", str(dest),
                    *(f"{n}=={versions[norm(n)]}" for n in names)], check=True)


def strip_ray(wheel: Path) -> None:
    """Rewrite the Ray wheel without RAY_DROP, with RAY_STRIP stripped and RECORD to match, under the same name."""
    with zipfile.ZipFile(wheel) as src:
        if not any(n.startswith(RAY_DROP) for n in src.namelist()):
            return  # stripped already
        out = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst, tempfile.TemporaryDirectory() as tmp:
            record, record_info = [], None
            for info in src.infolist():
                name = info.filename
                if name.startswith(RAY_DROP) or (name.startswith("ray/dashboard/") and name.endswith(".map")):
                    continue
                if name.endswith(".dist-info/RECORD"):
                    record_info = info  # written last, listing what the new wheel holds
                    continue
                data = src.read(info)
                if name in RAY_STRIP:
                    (binary := Path(tmp) / "binary").write_bytes(data)
                    subprocess.run(["strip", "--strip-unneeded", str(binary)], check=True)
                    data = binary.read_bytes()
                dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)  # info keeps the executable bits
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                record.append(f"{name},sha256={digest},{len(data)}\n")
            dst.writestr(record_info, "".join(record) + f"{record_info.filename},,\n",
                         compress_type=zipfile.ZIP_DEFLATED)
    out.replace(wheel)


def tree_bytes() -> int:
    """What a device call carries besides .whl: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sum((ROOT / p).stat().st_size for p in set(listed) if p and (ROOT / p).is_file())


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def build() -> None:
    KIT.mkdir(exist_ok=True)
    for stale in [*KIT.glob("*.whl"), *FALLBACK.glob("*.whl")]:
        stale.unlink()  # one version of each, and nothing left from an older list
    download([n for n in KIT_NAMES if n not in PURE], KIT)
    download(sorted(PURE), KIT, pure=True)
    download(FALLBACK_NAMES, FALLBACK, pure=True)
    strip_ray(next(KIT.glob("ray-*.whl")))
    wheels = sorted(KIT.rglob("*.whl"), key=lambda p: -p.stat().st_size)
    for w in wheels:
        print(f"{mib(w.stat().st_size):>10}  {w.relative_to(KIT)}")
    kit, tree = sum(w.stat().st_size for w in wheels), tree_bytes()
    print(f"kit {mib(kit)} in {len(wheels)} wheels + tree {mib(tree)} = {mib(kit + tree)} of {mib(LIMIT)}"
          f" ({mib(LIMIT - kit - tree)} to spare)")
    if kit + tree > LIMIT:
        sys.exit("over the device's 64 MiB limit on what travels")


def check(site: str) -> None:
    """On the device, after the kit is in ``site``: each kit requirement that the image does not meet; a fallback
    wheel that meets it is installed into ``site``. Missing packages are reported, not fatal (some are unused)."""
    from importlib.metadata import PackageNotFoundError, distributions, version

    from packaging.requirements import Requirement

    fallbacks = {norm(w.name.split("-")[0]): w for w in FALLBACK.glob("*.whl")}
    for dist in list(distributions(path=[site])):
        extras = {"ray": ["default", "data", "train", "tune"]}.get(norm(dist.name), [""])
        for req in map(Requirement, dist.requires or []):
            name = norm(req.name)
            if name in LEFT_OUT or (req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras)):
                continue
            try:
                found = version(req.name)
            except PackageNotFoundError:
                found = "missing"
            if found == "missing" or not req.specifier.contains(found, prereleases=True):
                print(f"kit check: {dist.name} needs {req.name}{req.specifier}, found {found}", flush=True)
                if name in fallbacks and req.specifier.contains(fallbacks[name].name.split("-")[1]):
                    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                    "--no-compile", "--upgrade", "--target", site, str(fallbacks.pop(name))],
                                   check=True)
                    print(f"kit check: installed {req.name} from .whl/fallback", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        check(os.environ.get("KIT_SITE", "/tmp/site"))
    else:
        build()
