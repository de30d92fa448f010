"""search_spaces/*.yaml -> a validated sweep spec: Tune domains over dotted JobConfig keys.

    metric: val_top1
    mode: max
    num_samples: 8
    max_concurrent_trials: auto        # cluster resources / resources of one trial
    scheduler: {name: asha, grace_period: 2, reduction_factor: 3}   # hyperband, pbt, fifo
    search: {name: random}             # grid, optuna (TPE); include_base: true tries the job's own values first
    params:
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.kwargs.depth: {choice: [2, 4, 6]}

Every key is checked against the JobConfig schema before anything starts; PBT's mutations use the same
grammar. Distributions: uniform, loguniform, quniform, randint, choice, grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitlab.config import check_key, read_yaml
from vitlab.errors import ConfigError

DISTRIBUTIONS = {
    "uniform": 2,
    "loguniform": 2,
    "quniform": 3,
    "randint": 2,
    "choice": None,  # any non-empty list
    "grid": None,
}
SCHEDULERS = ("asha", "hyperband", "pbt", "fifo")
SEARCHERS = ("random", "grid", "optuna")
TOP_KEYS = ("metric", "mode", "num_samples", "max_concurrent_trials", "scheduler", "search", "params")


@dataclass
class SweepSpec:
    source: str
    params: dict[str, dict[str, Any]]
    metric: str = "val_top1"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent_trials: int | str = "auto"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "fifo"})
    search: dict[str, Any] = field(default_factory=lambda: {"name": "random"})

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in TOP_KEYS}


def _check_dist(source: str, key: str, spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{source}: params.{key}: expected one distribution, e.g. {{loguniform: [1e-4, 1e-2]}}, "
                          f"got {spec!r}")
    (name, args), = spec.items()
    if name not in DISTRIBUTIONS:
        import difflib

        close = difflib.get_close_matches(str(name), DISTRIBUTIONS, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; expected one of {', '.join(DISTRIBUTIONS)}"
        raise ConfigError(f"{source}: params.{key}: unknown distribution '{name}'{hint}")
    arity = DISTRIBUTIONS[name]
    if not isinstance(args, list) or not args or (arity is not None and len(args) != arity):
        want = f"a list of {arity} numbers" if arity else "a non-empty list of values"
        raise ConfigError(f"{source}: params.{key}: {name} expects {want}, got {args!r}")
    if arity is not None:
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{source}: params.{key}: {name} expects numbers, got {args!r}")
        if args[0] >= args[1]:
            raise ConfigError(f"{source}: params.{key}: {name} expects low < high, got {args!r}")
        if name == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{source}: params.{key}: loguniform expects positive bounds, got {args!r}")
    return {name: args}


def _check_params(source: str, params: Any, section: str) -> dict[str, dict[str, Any]]:
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{source}: {section}: expected a mapping of dotted JobConfig keys to distributions")
    out = {}
    for key, spec in params.items():
        check_key(str(key), f"{source}: {section}")
        out[str(key)] = _check_dist(source, key, spec)
    return out


def load_space(path: str | Path, num_samples: int | None = None) -> SweepSpec:
    """Read and validate a search-space file; every problem is one ConfigError line naming the key."""
    source = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], TOP_KEYS, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; expected {', '.join(TOP_KEYS)}"
        raise ConfigError(f"{source}: unknown key '{unknown[0]}'{hint}")
    if "params" not in raw:
        raise ConfigError(f"{source}: params: missing (the dotted JobConfig keys to search)")
    spec = SweepSpec(source=source, params=_check_params(source, raw["params"], "params"))
    spec.metric = str(raw.get("metric", spec.metric))
    spec.mode = str(raw.get("mode", spec.mode))
    if spec.mode not in ("max", "min"):
        raise ConfigError(f"{source}: mode: expected max or min, got {spec.mode!r}")
    spec.num_samples = int(num_samples if num_samples is not None else raw.get("num_samples", spec.num_samples))
    if spec.num_samples < 1:
        raise ConfigError(f"{source}: num_samples: expected at least 1, got {spec.num_samples}")
    mct = raw.get("max_concurrent_trials", "auto")
    if mct != "auto" and (not isinstance(mct, int) or mct < 1):
        raise ConfigError(f"{source}: max_concurrent_trials: expected 'auto' or a positive integer, got {mct!r}")
    spec.max_concurrent_trials = mct
    spec.scheduler = _named(source, "scheduler", raw.get("scheduler", {"name": "fifo"}), SCHEDULERS)
    spec.search = _named(source, "search", raw.get("search", {"name": "random"}), SEARCHERS)
    if spec.scheduler["name"] == "pbt":
        mutations = spec.scheduler.get("hyperparam_mutations") or spec.params
        spec.scheduler["hyperparam_mutations"] = _check_params(source, mutations, "scheduler.hyperparam_mutations")
    grids = [k for k, d in spec.params.items() if "grid" in d]
    if grids and spec.search["name"] not in ("random", "grid"):
        raise ConfigError(f"{source}: params.{grids[0]}: grid needs search.name random or grid, "
                          f"not {spec.search['name']}")
    unknown = sorted(set(spec.search) - {"name", "include_base"})
    if unknown:
        raise ConfigError(f"{source}: search.{unknown[0]}: unknown key; expected name, include_base")
    if not isinstance(spec.search.get("include_base", False), bool):
        raise ConfigError(f"{source}: search.include_base: expected true or false, "
                          f"got {spec.search['include_base']!r}")
    if spec.search.get("include_base") and grids:
        raise ConfigError(f"{source}: search.include_base: not with a grid (params.{grids[0]})")
    return spec


def _named(source: str, section: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{source}: {section}: expected {{name: {allowed[0]}, ...}}, got {value!r}")
    if value["name"] not in allowed:
        raise ConfigError(f"{source}: {section}.name: expected one of {', '.join(allowed)}, got {value['name']!r}")
    return dict(value)


def tune_domain(dist: dict[str, Any]):
    """One distribution -> a Ray Tune search domain."""
    from ray import tune

    (name, args), = dist.items()
    if name == "uniform":
        return tune.uniform(*args)
    if name == "loguniform":
        return tune.loguniform(*args)
    if name == "quniform":
        return tune.quniform(*args)
    if name == "randint":
        return tune.randint(*args)
    if name == "choice":
        return tune.choice(args)
    return tune.grid_search(args)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: one flat entry per dotted key (Tune would split nested dicts itself)."""
    return {key: tune_domain(dist) for key, dist in spec.params.items()}
