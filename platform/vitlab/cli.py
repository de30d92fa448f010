"""The ``vitlab`` command line: the parser, and ``main``, which routes each subcommand to its function in
commands.py. Bad input (a UserError anywhere below) is printed as one line and exits with code 2, no
traceback. The choices of --format, --quantize and --runtime come from the registries.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from vitlab import commands, logs
from vitlab.cluster import keep_local_ray_on_loopback
from vitlab.data.sources import READERS
from vitlab.deploy import onnx
from vitlab.deploy.runtimes import RUNTIMES
from vitlab.errors import UserError
from vitlab.redact import redact

log = logging.getLogger("vitlab")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected WIDTHxHEIGHT, e.g. 500x375") from None
    return w, h


# ---------------------------------------------------------------------------------------------------------
# Parser


MODEL_HELP = ("best_model.pt or a checkpoint directory from 'vitlab train', or an MLflow model URI "
              "(runs:/<id>/model, models:/<name>@<alias>)")


class Parser(argparse.ArgumentParser):
    """argparse, with dotted key=value overrides taken wherever they stand: after the positionals argparse ends
    a nargs='*' list at the first option, so `sweep JOB SPACE --num-samples 8 optim.lr=1e-3` would be refused."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extra = self.parse_known_args(args, namespace)
        if extra and isinstance(getattr(parsed, "overrides", None), list) and all(_is_override(a) for a in extra):
            parsed.overrides = [*parsed.overrides, *extra]
        elif extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="vitlab", description="Train vision transformers at scale on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="show everything on the terminal: Ray's, MLflow's "
                   "and vitlab's debug lines (default: vitlab's lines and errors; the rest in the log file)")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare datasets").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="raw images -> Parquet shards + manifest (a Ray Data job)")
    prep.add_argument("source", help="dataset folder, or 'digits' (scikit-learn's digits, built in)")
    prep.add_argument("--out", required=True, help="output directory (or s3:// URI)")
    prep.add_argument("--format", choices=list(READERS), help="source layout (default: detected)")
    prep.add_argument("--val-fraction", type=float,
                      help="share of each class held out as val when the source has no val split (default 0.1; "
                      "digits: 0.2)")
    prep.add_argument("--max-side", type=int, help="re-encode images whose longer side exceeds this")
    prep.add_argument("--quality", type=int, help="JPEG quality for re-encoded images (1-100)")
    prep.add_argument("--shard-rows", type=int, help="rows per Parquet shard (default: 1024, fewer for "
                      "small datasets)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    prep.add_argument("--seed", type=int, default=0, help="seed for the val split and shard shuffling")
    prep.set_defaults(func=commands.cmd_data_prepare)

    verify = data.add_parser("verify", help="check every shard's sha256 and row count against the manifest")
    verify.add_argument("dataset", help="a directory or URI made by 'vitlab data prepare'")
    verify.set_defaults(func=commands.cmd_data_verify)

    synth = data.add_parser("synth", help="an ImageNet-like class-folder tree of synthetic JPEGs")
    synth.add_argument("--out", required=True)
    synth.add_argument("--classes", type=int, required=True)
    synth.add_argument("--per-class", type=int, required=True, help="train images per class")
    synth.add_argument("--val-per-class", type=int, help="val images per class (default: per-class / 5)")
    synth.add_argument("--size", type=_size, default=(500, 375), help="WIDTHxHEIGHT (default 500x375)")
    synth.add_argument("--quality", type=int, default=90)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=commands.cmd_data_synth)

    tr = sub.add_parser("train", help="train a job on Ray Train (RAY_ADDRESS or a local Ray)")
    tr.add_argument("job", help="jobs/*.yaml")
    tr.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    tr.add_argument("--resume-from", help="start from this checkpoint directory")
    tr.add_argument("--output-json", help="write the outcome (accuracy, run id, paths) here")
    tr.set_defaults(func=commands.cmd_train)

    sw = sub.add_parser("sweep", help="a Ray Tune sweep over a search space in search_spaces/")
    sw.add_argument("job", help="jobs/*.yaml: the base JobConfig of every trial")
    sw.add_argument("space", help="search_spaces/*.yaml")
    sw.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base job")
    sw.add_argument("--num-samples", type=int, help="override the space's num_samples")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    sw.add_argument("--output-json")
    sw.set_defaults(func=commands.cmd_sweep)

    ui = sub.add_parser("ui", help="start the MLflow UI for the configured store, on 127.0.0.1")
    ui.add_argument("job", nargs="?", help="a job file whose tracking.uri to use (default: "
                    "$MLFLOW_TRACKING_URI or ./mlflow.db)")
    ui.add_argument("overrides", nargs="*")
    ui.add_argument("--tracking-uri")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=commands.cmd_ui)

    address_help = ("the cluster's dashboard / job API URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, "
                    "http://127.0.0.1:8265, where `ray dashboard cluster.yaml` forwards it)")
    sm = sub.add_parser("submit", help="run a vitlab command as a Ray job on a cluster and stream its logs",
                        usage="vitlab submit [options] -- COMMAND [ARGS...]  (e.g. -- train jobs/x.yaml)")
    sm.add_argument("--address", help=address_help)
    sm.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    sm.add_argument("--working-dir", default=".", help="uploaded as the job's working directory, without data, "
                    "runs, MLflow stores, .venv, .git and secret files (default: .)")
    sm.add_argument("--include", action="append", metavar="PATH", help="upload this secret-looking file or "
                    "folder of the working dir after all (.env, *.pem, .aws/, ...: left out by default; repeatable)")
    sm.add_argument("--tracking-uri", help="MLFLOW_TRACKING_URI of the job (default: the cluster's own)")
    sm.add_argument("--storage-path", help="VITLAB_STORAGE_PATH of the job: where relative run.storage_path "
                    "values go, e.g. s3://bucket/vitlab (default: the cluster's own)")
    sm.add_argument("--env", action="append", metavar="KEY=VALUE", help="another environment variable of the "
                    "job (repeatable)")
    sm.add_argument("--python", default="python", help="the cluster's Python with vitlab's dependencies "
                    "(default: python)")
    sm.add_argument("vitlab_args", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                    help="a vitlab command and its arguments, after --")
    sm.set_defaults(func=commands.cmd_submit, parser=p)  # it checks the command it submits with this parser

    jobs = sub.add_parser("jobs", help="Ray jobs on a cluster: list, logs, status, stop").add_subparsers(
        dest="jobs_command", required=True)
    jl = jobs.add_parser("list", help="submitted jobs, newest first")
    jl.add_argument("--address", help=address_help)
    jl.set_defaults(func=commands.cmd_jobs_list)
    for name, func, text in (("logs", commands.cmd_jobs_logs, "a job's logs"), ("status", commands.cmd_jobs_status,
                             "a job's status"), ("stop", commands.cmd_jobs_stop, "stop a job and wait until it has")):
        jp = jobs.add_parser(name, help=text)
        jp.add_argument("job_id", metavar="JOB_ID")
        jp.add_argument("--address", help=address_help)
        if name == "logs":
            jp.add_argument("-f", "--follow", action="store_true", help="stream until the job ends; exit 0 "
                            "only if it SUCCEEDED")
        jp.set_defaults(func=func)

    ex = sub.add_parser("export", help="a trained model -> DIR/model.onnx + classes.json, checked against torch")
    ex.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (whole)")
    ex.add_argument("--opset", type=int, default=onnx.DEFAULT_OPSET,
                    help=f"ONNX opset ({onnx.MIN_OPSET}-{onnx.MAX_OPSET}, default {onnx.DEFAULT_OPSET})")
    ex.add_argument("--atol", type=float, default=onnx.PARITY_ATOL,
                    help="parity tolerance: max |onnxruntime - torch| in fp32")
    ex.add_argument("--optimize", action="store_true", help="fuse each attention block into onnxruntime's "
                    "Attention op (com.microsoft: runs on onnxruntime only), parity checked like the plain graph")
    ex.add_argument("--quantize", choices=list(onnx.QUANTIZERS), help="also write DIR/model.int8.onnx (dynamic "
                    "int8 weights), checked by its top-1 agreement with fp32 on the model's val images")
    ex.add_argument("--int8-min-agreement", type=float, default=onnx.INT8_MIN_AGREEMENT,
                    help=f"least share of check images where int8 and fp32 top-1 agree "
                    f"(default {onnx.INT8_MIN_AGREEMENT})")
    ex.add_argument("--tracking-uri", help="MLflow store for runs:/ and models:/ URIs (default: "
                    "$MLFLOW_TRACKING_URI or ./mlflow.db)")
    ex.add_argument("--output-json")
    ex.set_defaults(func=commands.cmd_export)

    reg = sub.add_parser("register", help="register a run's model in the MLflow Model Registry")
    reg.add_argument("run_id", metavar="RUN_ID", help="MLflow run id (from 'vitlab train' or the UI)")
    reg.add_argument("--name", required=True, help="registered model name")
    reg.add_argument("--alias", help="alias to point at the new version, e.g. champion")
    reg.add_argument("--tracking-uri")
    reg.add_argument("--output-json")
    reg.set_defaults(func=commands.cmd_register)

    pr = sub.add_parser("predict", help="top-k classes of images with the val preprocessing (--out: batch "
                        "prediction on Ray Data, written as Parquet)")
    pr.add_argument("model", metavar="MODEL", help=f"{MODEL_HELP}, or an export directory")
    pr.add_argument("images", metavar="DATA", nargs="+", help="image files or directories of images; with --out "
                    "also URIs of them, or a dataset from 'vitlab data prepare' (labelled: top-1 is printed)")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--out", metavar="PREDICTIONS", help="run on Ray Data (the model loaded once per worker "
                    "process) and write Parquet here (a new directory or s3:// URI)")
    pr.add_argument("--overwrite", action="store_true", help="replace earlier predictions in --out (whole)")
    pr.add_argument("--split", default="val", help="the split of a prepared dataset (val or train; default val)")
    pr.add_argument("--compute", choices=["tasks", "actors"], default="tasks", help="--out: Ray's tasks, each "
                    "process loading the model once (default: they start on Ray's already-running workers), or an "
                    "actor pool")
    pr.add_argument("--actors", type=int, help="--out: tasks or actors at a time (default: the cluster's CPUs / "
                    "--threads)")
    pr.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads (and CPUs) per actor")
    pr.add_argument("--tracking-uri")
    pr.add_argument("--output-json")
    pr.set_defaults(func=commands.cmd_predict)

    bench = sub.add_parser("bench", help="side-by-side benchmarks").add_subparsers(dest="bench_command",
                                                                                  required=True)
    bd = bench.add_parser("data", help="Ray Data pipeline vs the decode ceiling and the seed's DataLoader (original "
                          "files and the shards' bytes)")
    bd.add_argument("source", help="a class-folder tree (train/<class>/*.JPEG), e.g. from 'vitlab data synth'")
    bd.add_argument("--image-size", type=int, default=224)
    bd.add_argument("--batch-size", type=int, default=128)
    bd.add_argument("--max-side", type=int, default=256, help="prepare's re-encode size (ImageNet's)")
    bd.add_argument("--quality", type=int, default=90)
    bd.add_argument("--seconds", type=float, default=30.0, help="measuring time per side")
    bd.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader worker processes")
    bd.add_argument("--output-json")
    bd.set_defaults(func=commands.cmd_bench_data)

    bi = bench.add_parser("infer", help="batch-1 latency and batch throughput: torch eager, torch.compile, "
                          "onnxruntime fp32 (plain and --optimize's fused graph) and int8")
    bi.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    bi.add_argument("--image-size", type=int, default=224)
    bi.add_argument("--batch-size", type=int, default=32, help="batch size of the throughput measurement")
    bi.add_argument("--iters", type=int, help="timed batch-1 iterations per runtime (default 60; quick 6)")
    bi.add_argument("--threads", type=int, help="intra-op threads for every runtime (default: all cores)")
    bi.add_argument("--opset", type=int, default=onnx.DEFAULT_OPSET)
    bi.add_argument("--runtime", action="append", choices=list(RUNTIMES),
                    help="a runtime to time (repeatable; default: all; torch_eager always runs, as the reference)")
    bi.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    bi.add_argument("--quick", action="store_true", help="a tiny model and a few iterations (tests)")
    bi.add_argument("--output-json")
    bi.set_defaults(func=commands.cmd_bench_infer)

    bp = bench.add_parser("predict", help="Ray Data batch predict (--out) vs the single-process predict on the "
                          "same images")
    bp.add_argument("source", nargs="?", help="a folder of images to take them from, cycled (default: synthetic "
                    "500x375 JPEGs)")
    bp.add_argument("--images", type=int, help="images per side (default 1000; quick 48)")
    bp.add_argument("--model", help="timm model name at --image-size, random weights (default: the digits job's "
                    "ViT: vit_tiny_patch16_224, patch 4, width 96, depth 4)")
    bp.add_argument("--image-size", type=int, default=32)
    bp.add_argument("--batch-size", type=int, default=32)
    bp.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch", help="onnxruntime: the model "
                    "exported first, the export directory on both sides")
    bp.add_argument("--compute", choices=["tasks", "actors"], default="tasks", help="the Ray Data side's --compute")
    bp.add_argument("--quick", action="store_true", help="a tiny model and a few small images (tests)")
    bp.add_argument("--output-json")
    bp.set_defaults(func=commands.cmd_bench_predict)

    bt = bench.add_parser("train", help="train steps inside a Ray Train worker vs a plain PyTorch loop; --device "
                          "cuda: images/s per GPU with CPU and with GPU decode")
    bt.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: one GPU, ViT-S/16 at 224 px in "
                    "bf16 fed from real shards, data.decode cpu and gpu side by side (docs/benchmarks.md)")
    bt.add_argument("--model", help="timm model name (random weights; default vit_tiny_patch16_224, on cuda "
                    "vit_small_patch16_224)")
    bt.add_argument("--image-size", type=int, help="default 112, on cuda 224")
    bt.add_argument("--batch-size", type=int, help="global batch per step (default 32; on cuda per GPU, 128)")
    bt.add_argument("--steps", type=int, help="timed steps per side (default 30; quick 4)")
    bt.add_argument("--windows", type=int, help="alternating timing windows the steps are split into (default 6; "
                    "quick 2)")
    bt.add_argument("--warmup", type=int, help="untimed steps first (default 5; quick 1)")
    bt.add_argument("--threads", type=int, help="torch threads of the 1-worker and plain sides (default: all "
                    "cores)")
    bt.add_argument("--quick", action="store_true", help="a tiny model and a few steps (tests)")
    bt.add_argument("--output-json")
    bt.set_defaults(func=commands.cmd_bench_train)
    return p


def _validate_common(args: argparse.Namespace) -> None:
    q = getattr(args, "quality", None)
    if q is not None and not 1 <= q <= 100:
        raise UserError(f"--quality {q}: expected 1-100")
    m = getattr(args, "max_side", None)
    if m is not None and m < 8:
        raise UserError(f"--max-side {m}: expected at least 8 pixels")


# Commands that run Ray, MLflow or torch work: their third-party chatter goes to a log file, named at the end.
# The value: the libraries (beside MLflow) the command uses, imported first so that the loggers they set up at
# import are adopted before they say anything.
LOGGED_COMMANDS = {"data prepare": ("ray",), "train": ("ray", "torch"), "sweep": ("ray", "torch"),
                   "bench data": ("ray", "torch"), "bench train": ("ray", "torch"), "export": ("torch",),
                   "predict": ("ray", "torch"), "register": (), "bench infer": ("torch",),
                   "bench predict": ("ray", "torch")}


def command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, "data_command", None) or getattr(args, "bench_command", None) \
        or getattr(args, "jobs_command", None)
    return f"{args.command} {sub}" if sub else args.command


def main(argv: list[str] | None = None) -> int:
    keep_local_ray_on_loopback()
    args = build_parser().parse_args(argv)
    name = command_name(args)
    logs.setup(args.verbose, logs.default_log_path(name) if name in LOGGED_COMMANDS else None)
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        _validate_common(args)
        if name in LOGGED_COMMANDS:
            logs.import_quietly(LOGGED_COMMANDS[name])
        func(args)
    except UserError as e:  # bad input: the one line says it all
        print(f"vitlab: error: {redact(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("vitlab: interrupted", file=sys.stderr)
        _name_log()
        return 130
    except SystemExit:
        _name_log()
        raise
    _name_log()
    return 0


def _name_log() -> None:
    path = logs.log_path()
    if path is not None:
        print(f"full log: {path}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
