"""`vitlab bench train`: what running training steps inside Ray Train costs, against a plain PyTorch loop.

One model, one synthetic in-memory batch (no data pipeline: this measures the step, not the input), AdamW,
cross-entropy, forward + backward + step:

(a) ``ray_1x{T}``: inside one Ray Train worker (TorchTrainer, ``prepare_model``) reserving all T cores,
    with T torch threads;
(b) ``plain_1x{T}``: a plain PyTorch loop in a fresh process (no Ray in it), with the same T threads;
(c) ``ray_2x{T/2}``: two Ray Train workers (DDP over gloo) with T/2 threads and half the batch each, the same
    global batch: data parallelism inside one machine against intra-op threads (a).

``ratio`` = (a) / (b). On a machine shared with other work a few minutes can change the answer more than the
overhead being measured, so (a) and (b) are both kept alive and timed in alternating windows (b, a, a, b,
b, ...), each window a fixed number of steps run while the other side waits idle; each side's rate is all its
images over all its window time. A Ray side's window is timed inside its workers (the slowest one's), so
start-up and scheduling are not counted (reported apart as ``fit_s``). (c) runs after, in the same windows.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any

import torch
import torch.distributed as dist

from vitlab.bench.common import bench_model, check_positive, cores, load_avg
from vitlab.cluster import connect
from vitlab.errors import UserError
from vitlab.model import create_model

# Ray is imported inside the functions of the Ray sides: side (b) runs this module in a spawned process that
# must not load Ray at all.

log = logging.getLogger(__name__)

TIMEOUT_S = 900.0  # for one window or one side's start-up: a hung side fails the benchmark, never hangs it


@dataclass
class StepSpec:
    """What every side runs: the same model, batch and step count."""

    model_name: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 1000
    image_size: int = 112
    batch_size: int = 32  # per process
    warmup: int = 5
    threads: int = 2
    seed: int = 0


class StepRunner:
    """A model, its optimizer and one in-memory batch; ``time(n)`` runs n training steps and times them."""

    def __init__(self, spec: StepSpec, wrap=None):
        torch.set_num_threads(spec.threads)
        torch.manual_seed(spec.seed)
        model = create_model(spec.model_name, spec.num_classes, spec.model_kwargs)
        self.model = (wrap(model) if wrap is not None else model).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size)
        self.y = torch.randint(0, spec.num_classes, (spec.batch_size,))
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.spec = spec
        self.loss = float("nan")
        for _ in range(spec.warmup):
            self.step()

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        self.loss = loss.item()

    def time(self, steps: int) -> float:
        """Seconds for ``steps`` steps; under DDP every worker starts together and the slowest one counts."""
        distributed = dist.is_initialized()
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        if distributed:
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        return float(seconds.item())


# ---------------------------------------------------------------------------------------------------------
# (b) the plain loop: a spawned process without Ray, driven window by window through a pipe


def _plain_server(spec_dict: dict[str, Any], conn) -> None:
    runner = StepRunner(StepSpec(**spec_dict))
    conn.send(("ready", torch.get_num_threads()))
    while (steps := conn.recv()) is not None:
        conn.send(runner.time(steps))


class PlainSide:
    def __init__(self, spec: StepSpec):
        ctx = get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_plain_server, args=(asdict(spec), child), daemon=True)
        self.proc.start()
        self.threads = self._recv()[1]

    def _recv(self):
        if not self.conn.poll(TIMEOUT_S):
            raise RuntimeError("the plain PyTorch side did not answer")
        return self.conn.recv()

    def window(self, steps: int) -> float:
        self.conn.send(steps)
        return float(self._recv())

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the process is already gone
            self.conn.send(None)
        self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()


# ---------------------------------------------------------------------------------------------------------
# (a), (c): Ray Train workers, driven window by window through two Ray queues


def _ray_loop(config: dict[str, Any]) -> None:
    import ray.train
    from ray.train.torch import prepare_model

    go, done = config["go"], config["done"]
    runner = StepRunner(StepSpec(**config["spec"]), wrap=lambda m: prepare_model(m, move_to_device=False))
    rank0 = ray.train.get_context().get_world_rank() == 0
    if rank0:
        done.put(("ready", torch.get_num_threads()))
    while True:
        steps = torch.tensor([int(go.get()) if rank0 else 0])
        if dist.is_initialized():
            dist.broadcast(steps, src=0)  # the other ranks wait here while rank 0 waits for its turn
        if steps.item() <= 0:
            return
        seconds = runner.time(int(steps.item()))
        if rank0:
            done.put(seconds)


def bench_windows(spec: StepSpec, num_workers: int, storage: str, windows: int, steps: int,
                  plain: StepSpec | None = None) -> dict[str, Any]:
    """Time ``windows`` windows of ``steps`` steps on ``num_workers`` Ray Train workers and, when ``plain``
    is given, as many windows of the plain loop in alternation with them."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    go, done = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
    times: dict[str, list[float]] = {"ray": [], "plain": []}
    info: dict[str, Any] = {}

    def ray_window() -> float:
        go.put(steps)
        answer = done.get(timeout=TIMEOUT_S)
        if not isinstance(answer, float):
            raise RuntimeError(f"the Ray Train side stopped ({answer})")
        return answer

    def coordinate() -> None:
        side = None
        try:
            side = PlainSide(plain) if plain is not None else None
            info["plain_threads"] = side.threads if side else None
            ready = done.get(timeout=TIMEOUT_S)
            if not (isinstance(ready, tuple) and ready[0] == "ready"):
                raise RuntimeError(f"the Ray Train side stopped ({ready})")
            info["ray_threads"] = ready[1]
            for w in range(windows):
                # alternate who goes first, so neither side always follows the other
                order = ("plain", "ray") if w % 2 == 0 else ("ray", "plain")
                for name in order:
                    if name == "ray":
                        times["ray"].append(ray_window())
                    elif side is not None:
                        times["plain"].append(side.window(steps))
        except BaseException as e:  # handed to the main thread
            info["error"] = e
        finally:
            go.put(0)
            if side is not None:
                side.close()

    trainer = TorchTrainer(
        _ray_loop,
        train_loop_config={"spec": asdict(spec), "go": go, "done": done},
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=False,
                                               resources_per_worker={"CPU": float(spec.threads)}),
        run_config=ray.train.RunConfig(name=f"bench-train-{uuid.uuid4().hex[:8]}", storage_path=storage),
    )
    coordinator = threading.Thread(target=coordinate, daemon=True)
    coordinator.start()
    t0 = time.perf_counter()
    try:
        trainer.fit()  # the main thread: Ray Train installs signal handlers
    finally:
        done.put("training ended")  # wakes the coordinator if the workers died before answering
        coordinator.join(timeout=TIMEOUT_S)
    fit_s = time.perf_counter() - t0
    if "error" in info:
        raise info["error"]

    def rate(seconds: list[float], batch: int) -> dict[str, Any]:
        return {"images_per_s": round(batch * steps * len(seconds) / sum(seconds), 2),
                "seconds": round(sum(seconds), 3),
                "window_images_per_s": [round(batch * steps / s, 2) for s in seconds]}

    out = {"ray": {**rate(times["ray"], spec.batch_size * num_workers), "workers": num_workers,
                   "threads_per_worker": info["ray_threads"], "fit_s": round(fit_s, 1)}}
    if plain is not None:
        out["plain"] = {**rate(times["plain"], plain.batch_size), "workers": 1,
                        "threads_per_worker": info["plain_threads"]}
        # rate(a) / rate(b) of each pair of adjacent windows = plain seconds / Ray seconds
        pairs = sorted(p_s / r_s for p_s, r_s in zip(times["plain"], times["ray"], strict=True))
        out["window_ratio_median"] = round(pairs[len(pairs) // 2], 3)
    return out


def bench_train(model_name: str = "vit_tiny_patch16_224", image_size: int = 112, batch_size: int = 32,
                steps: int | None = None, warmup: int | None = None, threads: int | None = None,
                windows: int | None = None, quick: bool = False) -> dict[str, Any]:
    """Run the three sides and return the report (JSON keys in docs/benchmarks.md)."""
    import ray

    check_positive(image_size=image_size, batch_size=batch_size, steps=steps, threads=threads, windows=windows)
    if warmup is not None and warmup < 0:
        raise UserError(f"--warmup {warmup}: expected 0 or more")
    model_name, kwargs, image_size, batch_size, num_classes = bench_model(
        model_name, image_size, batch_size, quick, quick_batch=8)
    windows = windows or (2 if quick else 6)
    steps = steps or (4 if quick else 30)
    per_window = max(1, steps // windows)
    warmup = warmup if warmup is not None else (1 if quick else 5)
    threads = threads or cores()
    if batch_size % 2:
        raise UserError(f"--batch-size {batch_size}: expected an even number (the 2-worker side splits it)")
    half = max(1, threads // 2)

    one = StepSpec(model_name, kwargs, num_classes, image_size, batch_size, warmup, threads)
    two = StepSpec(model_name, kwargs, num_classes, image_size, batch_size // 2, warmup, half)
    connect()
    available = ray.cluster_resources().get("CPU", 0)
    if available < max(threads, 2 * half):
        raise UserError(f"--threads {threads}: the Ray cluster has {available:g} CPUs (each worker reserves as "
                        "many CPUs as it runs threads)")
    load_before = load_avg()
    storage = tempfile.mkdtemp(prefix="vitlab-bench-train-")
    try:
        paired = bench_windows(one, 1, storage, windows, per_window, plain=one)
        ray_two = bench_windows(two, 2, storage, windows, per_window)["ray"]
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    ray_one, plain = paired["ray"], paired["plain"]
    return {
        f"ray_1x{threads}": ray_one,
        f"plain_1x{threads}": plain,
        "ratio": round(ray_one["images_per_s"] / plain["images_per_s"], 3),
        "window_ratio_median": paired["window_ratio_median"],
        f"ray_2x{half}": ray_two,
        f"ratio_2x{half}_vs_1x{threads}": round(ray_two["images_per_s"] / ray_one["images_per_s"], 3),
        "settings": {
            "model": model_name, "model_kwargs": kwargs, "num_classes": num_classes, "image_size": image_size,
            "global_batch_size": batch_size, "windows": windows, "steps_per_window": per_window,
            "timed_steps": windows * per_window, "warmup": warmup, "threads": threads, "optimizer": "AdamW",
            "precision": "fp32", "data": "one synthetic in-memory batch", "quick": quick, "cores": cores(),
            "load_avg_1m": [load_before, load_avg()],
            "note": "a small ViT by default so the three sides finish in a minute or two",
        },
    }


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    t, h = s["threads"], max(1, s["threads"] // 2)
    a, b, c = report[f"ray_1x{t}"], report[f"plain_1x{t}"], report[f"ray_2x{h}"]
    return "\n".join([
        f"{s['model']} {s['image_size']}px, global batch {s['global_batch_size']}, {s['timed_steps']} timed steps "
        f"per side in {s['windows']} alternating windows after {s['warmup']} warm-up, fp32 AdamW, synthetic batch",
        f"(a) Ray Train, 1 worker x {t} threads:        {a['images_per_s']:8.1f} images/s",
        f"(b) plain PyTorch, 1 process x {t} threads:   {b['images_per_s']:8.1f} images/s",
        f"ratio (a)/(b): {report['ratio']:.3f}  (median over window pairs {report['window_ratio_median']:.3f})",
        f"(c) Ray Train, 2 workers x {h} thread{'s' if h > 1 else ''} (DDP): {c['images_per_s']:8.1f} images/s "
        f"= {report[f'ratio_2x{h}_vs_1x{t}']:.3f}x of (a)",
    ])
