"""The ``vitlab`` command: parse arguments, call one function, print the human summary last.

Bad input (a UserError anywhere below) is printed as one line and exits with code 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitlab.errors import UserError

log = logging.getLogger("vitlab")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': expected WIDTHxHEIGHT, e.g. 500x375") from None
    return w, h


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temp file, then rename)."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------------------
# Subcommands


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from vitlab.data.prepare import EncodeOptions, prepare, summary_line

    manifest = prepare(
        args.source,
        args.out,
        fmt=args.format,
        val_fraction=args.val_fraction,
        opts=EncodeOptions(max_side=args.max_side, quality=args.quality),
        shard_rows=args.shard_rows,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    print(summary_line(args.out, manifest))


def cmd_data_synth(args: argparse.Namespace) -> None:
    from vitlab.data.synth import synth_tree

    counts = synth_tree(args.out, args.classes, args.per_class, args.size, args.quality, args.val_per_class,
                        args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val JPEGs ({args.classes} classes, "
          f"{args.size[0]}x{args.size[1]}, q{args.quality}) to {args.out}")


def cmd_bench_data(args: argparse.Namespace) -> None:
    from vitlab.bench.data import bench_data, format_report

    report = bench_data(args.source, image_size=args.image_size, batch_size=args.batch_size,
                        max_side=args.max_side, quality=args.quality, seconds=args.seconds,
                        workers=args.workers)
    write_json(args.output_json, report)
    print(format_report(report))


def cmd_train(args: argparse.Namespace) -> None:
    from vitlab.config import load_job
    from vitlab.train.trainer import TrainingError, summary, train

    cfg = load_job(args.job, args.overrides)
    try:
        outcome = train(cfg, resume_from=args.resume_from)
    except TrainingError as e:
        print(f"vitlab: training failed: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    write_json(args.output_json, outcome.to_json())
    print(summary(outcome))


def cmd_sweep(args: argparse.Namespace) -> None:
    from vitlab.config import load_job
    from vitlab.tune.space import load_space
    from vitlab.tune.sweep import format_table, run_sweep

    cfg = load_job(args.job, args.overrides)
    spec = load_space(args.space, args.num_samples)
    report = run_sweep(cfg, spec, args.space, resume=args.resume)
    write_json(args.output_json, report)
    print(format_table(report))


def cmd_ui(args: argparse.Namespace) -> None:
    from vitlab.config import load_job
    from vitlab.tracking import default_artifact_location, resolve_tracking_uri

    cfg = load_job(args.job, args.overrides) if args.job else None
    uri = resolve_tracking_uri(args.tracking_uri or (cfg.tracking.uri if cfg else None))
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    artifacts = default_artifact_location(uri)
    if artifacts:
        cmd += ["--default-artifact-root", artifacts]
    print(f"MLflow UI for {uri}: http://{args.host}:{args.port}  (Ctrl-C to stop)", flush=True)
    os.execv(sys.executable, cmd)


def cmd_submit(args: argparse.Namespace) -> None:
    from vitlab.jobs import parse_env, submit

    code = submit(args.vitlab_args, address=args.address, working_dir=args.working_dir, wait=not args.no_wait,
                  tracking_uri=args.tracking_uri, storage_path=args.storage_path, env=parse_env(args.env),
                  python=args.python)
    if code:
        raise SystemExit(code)


def cmd_jobs_list(args: argparse.Namespace) -> None:
    from vitlab.jobs import list_jobs

    print(list_jobs(args.address))


def cmd_jobs_logs(args: argparse.Namespace) -> None:
    from vitlab.jobs import job_logs

    code = job_logs(args.job_id, args.address, follow_logs=args.follow)
    if code:
        raise SystemExit(code)


def cmd_jobs_status(args: argparse.Namespace) -> None:
    from vitlab.jobs import job_status

    print(job_status(args.job_id, args.address))


def cmd_jobs_stop(args: argparse.Namespace) -> None:
    from vitlab.jobs import stop_job

    print(stop_job(args.job_id, args.address))


def cmd_export(args: argparse.Namespace) -> None:
    from vitlab.export import ParityError, export, format_export, load_bundle

    bundle = load_bundle(args.model, args.tracking_uri)
    try:
        report = export(bundle, args.out, opset=args.opset, atol=args.atol, quantize=args.quantize,
                        int8_min_agreement=args.int8_min_agreement)
    except ParityError as e:
        print(f"vitlab: export failed the parity check: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    write_json(args.output_json, report)
    print(format_export(report))


def cmd_register(args: argparse.Namespace) -> None:
    from vitlab.tracking import register_model

    report = register_model(args.tracking_uri, args.run_id, args.name, args.alias)
    write_json(args.output_json, report)
    alias = f" (alias {report['alias']})" if report["alias"] else ""
    print(f"registered {report['source']} as {report['name']} version {report['version']}{alias}: "
          f"{report['model_uri']} in {report['tracking_uri']}")


def cmd_predict(args: argparse.Namespace) -> None:
    from vitlab.export import format_predictions, load_bundle, predict

    bundle = load_bundle(args.model, args.tracking_uri)
    report = predict(bundle, args.images, top_k=args.top_k, batch_size=args.batch_size)
    for r in report["results"]:
        if "error" in r:
            print(f"vitlab: {r['path']}: {r['error']}", file=sys.stderr)
    write_json(args.output_json, report)
    print(format_predictions(report))


def cmd_bench_infer(args: argparse.Namespace) -> None:
    from vitlab.bench.infer import bench_infer, format_report

    report = bench_infer(model_name=args.model, image_size=args.image_size, batch_size=args.batch_size,
                         threads=args.threads, iters=args.iters, compile=not args.no_compile, quick=args.quick,
                         opset=args.opset)
    write_json(args.output_json, report)
    print(format_report(report))


def cmd_bench_train(args: argparse.Namespace) -> None:
    from vitlab.bench.train import bench_train, format_report

    report = bench_train(model_name=args.model, image_size=args.image_size, batch_size=args.batch_size,
                         steps=args.steps, warmup=args.warmup, threads=args.threads, windows=args.windows,
                         quick=args.quick)
    write_json(args.output_json, report)
    print(format_report(report))


# ---------------------------------------------------------------------------------------------------------
# Parser


MODEL_HELP = ("best_model.pt or a checkpoint directory from 'vitlab train', or an MLflow model URI "
              "(runs:/<id>/model, models:/<name>@<alias>)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitlab", description="Train vision transformers at scale on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="prepare datasets").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="raw images -> Parquet shards + manifest (a Ray Data job)")
    prep.add_argument("source", help="dataset folder, or 'digits' (scikit-learn's digits, built in)")
    prep.add_argument("--out", required=True, help="output directory (or s3:// URI)")
    prep.add_argument("--format", choices=["digits", "imagenet", "folders", "tiny_imagenet", "cifar100"],
                      help="source layout (default: detected)")
    prep.add_argument("--val-fraction", type=float, default=0.1,
                      help="share of each class held out as val when the source has no val split")
    prep.add_argument("--max-side", type=int, help="re-encode images whose longer side exceeds this")
    prep.add_argument("--quality", type=int, help="JPEG quality for re-encoded images (1-100)")
    prep.add_argument("--shard-rows", type=int, help="rows per Parquet shard (default: 1024, fewer for "
                      "small datasets)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    prep.add_argument("--seed", type=int, default=0, help="seed for the val split and shard shuffling")
    prep.set_defaults(func=cmd_data_prepare)

    synth = data.add_parser("synth", help="an ImageNet-like class-folder tree of synthetic JPEGs")
    synth.add_argument("--out", required=True)
    synth.add_argument("--classes", type=int, required=True)
    synth.add_argument("--per-class", type=int, required=True, help="train images per class")
    synth.add_argument("--val-per-class", type=int, help="val images per class (default: per-class / 5)")
    synth.add_argument("--size", type=_size, default=(500, 375), help="WIDTHxHEIGHT (default 500x375)")
    synth.add_argument("--quality", type=int, default=90)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)

    tr = sub.add_parser("train", help="train a job on Ray Train (RAY_ADDRESS or a local Ray)")
    tr.add_argument("job", help="jobs/*.yaml")
    tr.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=3e-4")
    tr.add_argument("--resume-from", help="start from this checkpoint directory")
    tr.add_argument("--output-json", help="write the outcome (accuracy, run id, paths) here")
    tr.set_defaults(func=cmd_train)

    sw = sub.add_parser("sweep", help="a Ray Tune sweep over a search space in search_spaces/")
    sw.add_argument("job", help="jobs/*.yaml: the base JobConfig of every trial")
    sw.add_argument("space", help="search_spaces/*.yaml")
    sw.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base job")
    sw.add_argument("--num-samples", type=int, help="override the space's num_samples")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep (Tuner.restore)")
    sw.add_argument("--output-json")
    sw.set_defaults(func=cmd_sweep)

    ui = sub.add_parser("ui", help="start the MLflow UI for the configured store, on 127.0.0.1")
    ui.add_argument("job", nargs="?", help="a job file whose tracking.uri to use (default: "
                    "$MLFLOW_TRACKING_URI or ./mlflow.db)")
    ui.add_argument("overrides", nargs="*")
    ui.add_argument("--tracking-uri")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

    address_help = ("the cluster's dashboard / job API URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, "
                    "http://127.0.0.1:8265, where `ray dashboard cluster.yaml` forwards it)")
    sm = sub.add_parser("submit", help="run a vitlab command as a Ray job on a cluster and stream its logs",
                        usage="vitlab submit [options] -- COMMAND [ARGS...]  (e.g. -- train jobs/x.yaml)")
    sm.add_argument("--address", help=address_help)
    sm.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    sm.add_argument("--working-dir", default=".", help="uploaded as the job's working directory, without data, "
                    "runs, MLflow stores, .venv, .git (default: .)")
    sm.add_argument("--tracking-uri", help="MLFLOW_TRACKING_URI of the job (default: the cluster's own)")
    sm.add_argument("--storage-path", help="VITLAB_STORAGE_PATH of the job: where relative run.storage_path "
                    "values go, e.g. s3://bucket/vitlab (default: the cluster's own)")
    sm.add_argument("--env", action="append", metavar="KEY=VALUE", help="another environment variable of the "
                    "job (repeatable)")
    sm.add_argument("--python", default="python", help="the cluster's Python with vitlab's dependencies "
                    "(default: python)")
    sm.add_argument("vitlab_args", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                    help="a vitlab command and its arguments, after --")
    sm.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="Ray jobs on a cluster: list, logs, status, stop").add_subparsers(
        dest="jobs_command", required=True)
    jl = jobs.add_parser("list", help="submitted jobs, newest first")
    jl.add_argument("--address", help=address_help)
    jl.set_defaults(func=cmd_jobs_list)
    for name, func, text in (("logs", cmd_jobs_logs, "a job's logs"), ("status", cmd_jobs_status,
                             "a job's status"), ("stop", cmd_jobs_stop, "stop a job and wait until it has")):
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
    ex.add_argument("--format", choices=["onnx"], default="onnx")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset (14-20, default 17)")
    ex.add_argument("--atol", type=float, default=1e-4, help="parity tolerance: max |onnxruntime - torch| in fp32")
    ex.add_argument("--quantize", choices=["int8"], help="also write DIR/model.int8.onnx (dynamic int8 weights), "
                    "checked by its top-1 agreement with fp32 on the model's val images")
    ex.add_argument("--int8-min-agreement", type=float, default=0.99,
                    help="least share of check images where int8 and fp32 top-1 agree (default 0.99)")
    ex.add_argument("--tracking-uri", help="MLflow store for runs:/ and models:/ URIs (default: "
                    "$MLFLOW_TRACKING_URI or ./mlflow.db)")
    ex.add_argument("--output-json")
    ex.set_defaults(func=cmd_export)

    reg = sub.add_parser("register", help="register a run's model in the MLflow Model Registry")
    reg.add_argument("run_id", metavar="RUN_ID", help="MLflow run id (from 'vitlab train' or the UI)")
    reg.add_argument("--name", required=True, help="registered model name")
    reg.add_argument("--alias", help="alias to point at the new version, e.g. champion")
    reg.add_argument("--tracking-uri")
    reg.add_argument("--output-json")
    reg.set_defaults(func=cmd_register)

    pr = sub.add_parser("predict", help="top-k classes of images with the val preprocessing")
    pr.add_argument("model", metavar="MODEL", help=f"{MODEL_HELP}, or an export directory")
    pr.add_argument("images", metavar="IMAGE", nargs="+", help="image files or directories of images")
    pr.add_argument("--top-k", type=int, default=5)
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--tracking-uri")
    pr.add_argument("--output-json")
    pr.set_defaults(func=cmd_predict)

    bench = sub.add_parser("bench", help="side-by-side benchmarks").add_subparsers(dest="bench_command",
                                                                                  required=True)
    bd = bench.add_parser("data", help="Ray Data pipeline vs the seed's torch DataLoader over ImageFolder")
    bd.add_argument("source", help="a class-folder tree (train/<class>/*.JPEG), e.g. from 'vitlab data synth'")
    bd.add_argument("--image-size", type=int, default=224)
    bd.add_argument("--batch-size", type=int, default=128)
    bd.add_argument("--max-side", type=int, default=256, help="prepare's re-encode size (README's ImageNet setting)")
    bd.add_argument("--quality", type=int, default=90)
    bd.add_argument("--seconds", type=float, default=30.0, help="measuring time per side")
    bd.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader worker processes")
    bd.add_argument("--output-json")
    bd.set_defaults(func=cmd_bench_data)

    bi = bench.add_parser("infer", help="batch-1 latency and batch throughput: torch eager, torch.compile, "
                          "onnxruntime fp32 and int8")
    bi.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    bi.add_argument("--image-size", type=int, default=224)
    bi.add_argument("--batch-size", type=int, default=32, help="batch size of the throughput measurement")
    bi.add_argument("--iters", type=int, help="timed batch-1 iterations per runtime (default 60; quick 6)")
    bi.add_argument("--threads", type=int, help="intra-op threads for every runtime (default: all cores)")
    bi.add_argument("--opset", type=int, default=17)
    bi.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    bi.add_argument("--quick", action="store_true", help="a tiny model and a few iterations (tests)")
    bi.add_argument("--output-json")
    bi.set_defaults(func=cmd_bench_infer)

    bt = bench.add_parser("train", help="train steps inside a Ray Train worker vs a plain PyTorch loop")
    bt.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name (random weights)")
    bt.add_argument("--image-size", type=int, default=112)
    bt.add_argument("--batch-size", type=int, default=32, help="global batch per step")
    bt.add_argument("--steps", type=int, help="timed steps per side (default 30; quick 4)")
    bt.add_argument("--windows", type=int, help="alternating timing windows the steps are split into (default 6; "
                    "quick 2)")
    bt.add_argument("--warmup", type=int, help="untimed steps first (default 5; quick 1)")
    bt.add_argument("--threads", type=int, help="torch threads of the 1-worker and plain sides (default: all "
                    "cores)")
    bt.add_argument("--quick", action="store_true", help="a tiny model and a few steps (tests)")
    bt.add_argument("--output-json")
    bt.set_defaults(func=cmd_bench_train)
    return p


def _validate_common(args: argparse.Namespace) -> None:
    q = getattr(args, "quality", None)
    if q is not None and not 1 <= q <= 100:
        raise UserError(f"--quality {q}: expected 1-100")
    m = getattr(args, "max_side", None)
    if m is not None and m < 8:
        raise UserError(f"--max-side {m}: expected at least 8 pixels")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        _validate_common(args)
        func(args)
    except UserError as e:
        print(f"vitlab: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("vitlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
