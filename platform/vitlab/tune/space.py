"""search_spaces/*.yaml -> a validated sweep spec: Tune domains over dotted JobConfig keys.

    metric: val_top1
    mode: max
    num_samples: 8
    max_concurrent_trials: auto        # cluster resources / resources of one trial
    scheduler: {name: asha, grace_period: 2, reduction_factor: 3}   # see SCHEDULERS
    search: {name: random}             # see SEARCHERS; include_base: true tries the job's own values first
    params:
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.kwargs.depth: {choice: [2, 4, 6]}

Every key is checked against the JobConfig schema before anything starts; PBT's mutations use the same
grammar. Distributions, schedulers and search algorithms each live in one dict below: adding one is one entry,
and the error messages list what is there. ray.tune is imported only when a sweep builds them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitlab.config import check_key, read_yaml
from vitlab.errors import ConfigError


@dataclass(frozen=True)
class Distribution:
    arity: int | None  # numbers it takes ([low, high] or [low, high, q]); None: a non-empty list of values
    domain: Callable[[list], Any]  # the arguments -> a Ray Tune search domain


def _tune():
    from ray import tune

    return tune


DISTRIBUTIONS: dict[str, Distribution] = {
    "uniform": Distribution(2, lambda a: _tune().uniform(*a)),
    "loguniform": Distribution(2, lambda a: _tune().loguniform(*a)),
    "quniform": Distribution(3, lambda a: _tune().quniform(*a)),
    "randint": Distribution(2, lambda a: _tune().randint(*a)),
    "choice": Distribution(None, lambda a: _tune().choice(a)),
    "grid": Distribution(None, lambda a: _tune().grid_search(a)),
}


@dataclass(frozen=True)
class Scheduler:
    options: dict[str, Any]  # every option it takes, with its default
    build: Callable[[dict[str, Any], int], Any]  # (options, max_t in epochs) -> a Tune scheduler


def _fifo(opts: dict[str, Any], max_t: int):
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def _asha(opts: dict[str, Any], max_t: int):
    from ray.tune.schedulers import AsyncHyperBandScheduler

    return AsyncHyperBandScheduler(time_attr="epoch", max_t=max_t, **opts)


def _hyperband(opts: dict[str, Any], max_t: int):
    from ray.tune.schedulers import HyperBandScheduler

    return HyperBandScheduler(time_attr="epoch", max_t=max_t, **opts)


def _pbt(opts: dict[str, Any], max_t: int):
    from vitlab.tune.pbt import VitlabPBT

    mutations = {k: tune_domain(d) for k, d in opts["hyperparam_mutations"].items()}
    return VitlabPBT(time_attr="epoch", **{**opts, "hyperparam_mutations": mutations})


SCHEDULERS: dict[str, Scheduler] = {
    "fifo": Scheduler({}, _fifo),
    "asha": Scheduler({"grace_period": 1, "reduction_factor": 3, "brackets": 1}, _asha),
    "hyperband": Scheduler({"reduction_factor": 3}, _hyperband),
    "pbt": Scheduler({"perturbation_interval": 2, "hyperparam_mutations": {}, "quantile_fraction": 0.25,
                      "resample_probability": 0.25, "synch": False}, _pbt),
}


@dataclass(frozen=True)
class Searcher:
    grids: bool  # whether params may use `grid`
    # (points to evaluate first or None, seed, max concurrent trials) -> a Tune search algorithm (None: Tune's own)
    build: Callable[[list[dict[str, Any]] | None, int, int], Any]


def _variants(points: list[dict[str, Any]] | None, seed: int, concurrency: int):
    """Tune's BasicVariantGenerator: random samples, grid_search expanded. Tune wraps only Searchers (Optuna)
    in its ConcurrencyLimiter: this one takes the limit itself."""
    if points is None:
        return None
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=concurrency)


def _optuna(points: list[dict[str, Any]] | None, seed: int, concurrency: int):
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=seed, points_to_evaluate=points)


SEARCHERS: dict[str, Searcher] = {
    "random": Searcher(True, _variants),
    "grid": Searcher(True, _variants),
    "optuna": Searcher(False, _optuna),  # TPE
}

# What every epoch report carries (train/loop.py): the keys a space may optimise.
METRICS = ("val_top1", "val_top5", "val_loss", "train_loss", "train_top1")
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


def _hint(value: str, allowed: Any) -> str:
    close = difflib.get_close_matches(str(value), list(allowed), n=2)
    return f"; did you mean {' or '.join(close)}?" if close else f"; expected one of {', '.join(allowed)}"


def _check_dist(source: str, key: str, spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{source}: params.{key}: expected one distribution, e.g. {{loguniform: [1e-4, 1e-2]}}, "
                          f"got {spec!r}")
    (name, args), = spec.items()
    if name not in DISTRIBUTIONS:
        raise ConfigError(f"{source}: params.{key}: unknown distribution '{name}'{_hint(name, DISTRIBUTIONS)}")
    arity = DISTRIBUTIONS[name].arity
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


def samples(dist: dict[str, Any]) -> list[Any]:
    """The values that stand for a distribution when checking it against the schema: a range's bounds, or
    every listed value."""
    (name, args), = dist.items()
    return args[:2] if DISTRIBUTIONS[name].arity is not None else list(args)


def _int(source: str, key: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{source}: {key}: expected an integer of at least {least}, got {value!r}")
    return value


def load_space(path: str | Path, num_samples: int | None = None) -> SweepSpec:
    """Read and validate a search-space file; every problem is one ConfigError line naming the key."""
    source = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], TOP_KEYS, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; expected {', '.join(TOP_KEYS)}"
        raise ConfigError(f"{source}: unknown key '{unknown[0]}'{hint}")
    if "params" not in raw:
        raise ConfigError(f"{source}: params: missing (the dotted JobConfig keys to search)")
    spec = SweepSpec(source=source, params=_check_params(source, raw["params"], "params"))
    spec.metric = str(raw.get("metric", spec.metric))
    if spec.metric not in METRICS:
        raise ConfigError(f"{source}: metric: '{spec.metric}' is not reported every epoch{_hint(spec.metric, METRICS)}")
    spec.mode = str(raw.get("mode", spec.mode))
    if spec.mode not in ("max", "min"):
        raise ConfigError(f"{source}: mode: expected max or min, got {spec.mode!r}")
    if num_samples is not None and num_samples < 1:
        raise ConfigError(f"--num-samples {num_samples}: expected at least 1")
    spec.num_samples = num_samples or _int(source, "num_samples", raw.get("num_samples", spec.num_samples), 1)
    mct = raw.get("max_concurrent_trials", "auto")
    spec.max_concurrent_trials = mct if mct == "auto" else _int(source, "max_concurrent_trials", mct, 1)
    spec.scheduler = _named(source, "scheduler", raw.get("scheduler", {"name": "fifo"}), SCHEDULERS)
    options = SCHEDULERS[spec.scheduler["name"]].options
    unknown = sorted(set(spec.scheduler) - {"name", *options})
    if unknown:
        raise ConfigError(f"{source}: scheduler.{unknown[0]}: not an option of {spec.scheduler['name']}"
                          + (f"; expected {', '.join(options)}" if options else " (it takes none)"))
    spec.scheduler = {**options, **spec.scheduler}
    if spec.scheduler["name"] == "pbt":
        mutations = spec.scheduler["hyperparam_mutations"] or spec.params
        spec.scheduler["hyperparam_mutations"] = _check_params(source, mutations, "scheduler.hyperparam_mutations")
    spec.search = _named(source, "search", raw.get("search", {"name": "random"}), SEARCHERS)
    grids = [k for k, d in spec.params.items() if "grid" in d]
    if grids and not SEARCHERS[spec.search["name"]].grids:
        allowed = ", ".join(n for n, s in SEARCHERS.items() if s.grids)
        raise ConfigError(f"{source}: params.{grids[0]}: grid needs search.name {allowed}, "
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


def _named(source: str, section: str, value: Any, registry: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{source}: {section}: expected {{name: {next(iter(registry))}, ...}}, got {value!r}")
    if value["name"] not in registry:
        raise ConfigError(f"{source}: {section}.name: expected one of {', '.join(registry)}, got {value['name']!r}")
    return dict(value)


def tune_domain(dist: dict[str, Any]):
    """One distribution -> a Ray Tune search domain."""
    (name, args), = dist.items()
    return DISTRIBUTIONS[name].domain(args)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: one flat entry per dotted key (Tune would split nested dicts itself)."""
    return {key: tune_domain(dist) for key, dist in spec.params.items()}


def scheduler(spec: SweepSpec, max_t: int):
    opts = {k: v for k, v in spec.scheduler.items() if k != "name"}
    return SCHEDULERS[spec.scheduler["name"]].build(opts, max_t)


def search_alg(spec: SweepSpec, points: list[dict[str, Any]] | None, seed: int, concurrency: int):
    return SEARCHERS[spec.search["name"]].build(points, seed, concurrency)
