"""What each `vitlab` subcommand does: check what the command line names, call one function, print the human
summary last (and write --output-json). cli.py builds the parser that routes here.

Subcommands that need torch or a Ray runtime import their module when they run, so `vitlab --help` and the
checks of bad input stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vitlab import tracking
from vitlab.bench import data as bench_data
from vitlab.bench import infer as bench_infer
from vitlab.config import load_job
from vitlab.data import prepare, synth
from vitlab.deploy import onnx, predict
from vitlab.deploy.bundle import load_bundle
from vitlab.errors import UserError
from vitlab.redact import redact
from vitlab.train import storage
from vitlab.train.preflight import preflight
from vitlab.tune.space import load_space

# Commands that make no sense as a job: a job cannot submit jobs, and the MLflow UI is a local server.
NOT_AS_JOB = {"submit", "jobs", "ui"}


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` (a local path or URI) whole, as every vitlab output is written."""
    if path:
        storage.write_text(path, json.dumps(payload, indent=2, default=str))


# ---------------------------------------------------------------------------------------------------------
# Subcommands


def cmd_data_prepare(args: argparse.Namespace) -> None:
    manifest = prepare.prepare(
        args.source,
        args.out,
        fmt=args.format,
        val_fraction=args.val_fraction,
        opts=prepare.EncodeOptions(max_side=args.max_side, quality=args.quality),
        shard_rows=args.shard_rows,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    print(prepare.summary_line(args.out, manifest))


def cmd_data_verify(args: argparse.Namespace) -> None:
    from vitlab.data.manifest import verify

    counts = verify(args.dataset)
    print(f"{args.dataset}: {counts['shards']} shards, {counts['rows']} rows, {counts['bytes']} bytes: every sha256 "
          "and row count matches the manifest")


def cmd_data_synth(args: argparse.Namespace) -> None:
    counts = synth.synth_tree(args.out, args.classes, args.per_class, args.size, args.quality, args.val_per_class,
                              args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val JPEGs ({args.classes} classes, "
          f"{args.size[0]}x{args.size[1]}, q{args.quality}) to {args.out}")


def cmd_bench_data(args: argparse.Namespace) -> None:
    report = bench_data.bench_data(args.source, image_size=args.image_size, batch_size=args.batch_size,
                                   max_side=args.max_side, quality=args.quality, seconds=args.seconds,
                                   workers=args.workers)
    write_json(args.output_json, report)
    print(bench_data.format_report(report))


def cmd_train(args: argparse.Namespace) -> None:
    cfg = load_job(args.job, args.overrides)
    checked = preflight(cfg)
    from vitlab.train.run import TrainingError, summary, train

    try:
        outcome = train(cfg, resume_from=args.resume_from, checked=checked)
    except TrainingError as e:
        print(f"vitlab: training failed: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    write_json(args.output_json, outcome.to_json())
    print(summary(outcome))


def cmd_sweep(args: argparse.Namespace) -> None:
    cfg = load_job(args.job, args.overrides)
    spec = load_space(args.space, args.num_samples)
    from vitlab.tune.sweep import format_table, run_sweep

    report = run_sweep(cfg, spec, args.space, resume=args.resume)
    write_json(args.output_json, report)
    print(format_table(report))


def cmd_ui(args: argparse.Namespace) -> None:
    cfg = load_job(args.job, args.overrides) if args.job else None
    uri = tracking.resolve_tracking_uri(args.tracking_uri or (cfg.tracking.uri if cfg else None))
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port)]
    artifacts = tracking.default_artifact_location(uri)
    if artifacts:
        cmd += ["--default-artifact-root", artifacts]
    print(f"MLflow UI for {redact(uri)}: http://{args.host}:{args.port}  (Ctrl-C to stop)", flush=True)
    # The UI needs no background job runner (about 8 worker processes that triple its start-up time on 2 cores)
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, cmd)


def check_submitted(parser: argparse.ArgumentParser, argv: list[str], working_dir: str | Path) -> list[str]:
    """The vitlab command a job will run, checked here first with the CLI's own parser: a typo or a bad config
    key fails before anything is uploaded. Returns it without a leading '--' or 'vitlab'."""
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if argv and argv[0] in ("vitlab", "vitlab.cli"):
        argv = argv[1:]
    if not argv:
        raise UserError("submit: no command given; e.g. vitlab submit -- train jobs/digits_vit.yaml")
    if argv[0] in NOT_AS_JOB:
        raise UserError(f"submit: 'vitlab {argv[0]}' does not run as a job")
    args = parser.parse_args(argv)  # argparse prints the usage line and exits 2 on a typo
    job = getattr(args, "job", None)
    if isinstance(job, str) and not job.startswith(("s3://", "gs://")):
        load_job(Path(working_dir) / job, getattr(args, "overrides", None) or [])
    return argv


def cmd_submit(args: argparse.Namespace) -> None:
    argv = check_submitted(args.parser, args.vitlab_args, args.working_dir)
    from vitlab.jobs import parse_env, submit

    code = submit(argv, address=args.address, working_dir=args.working_dir, wait=not args.no_wait,
                  tracking_uri=args.tracking_uri, storage_path=args.storage_path, env=parse_env(args.env),
                  python=args.python, include=tuple(args.include or ()))
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
    bundle = load_bundle(args.model, args.tracking_uri)
    try:
        report = onnx.export(bundle, args.out, opset=args.opset, atol=args.atol, quantize=args.quantize,
                             int8_min_agreement=args.int8_min_agreement, overwrite=args.overwrite,
                             optimize=args.optimize)
    except onnx.ExportCheckError as e:
        print(f"vitlab: export: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    write_json(args.output_json, report)
    print(onnx.format_export(report))


def cmd_register(args: argparse.Namespace) -> None:
    report = tracking.register_model(args.tracking_uri, args.run_id, args.name, args.alias)
    write_json(args.output_json, report)
    alias = f" (alias {report['alias']})" if report["alias"] else ""
    print(f"registered {report['source']} as {report['name']} version {report['version']}{alias}: "
          f"{report['model_uri']} in {report['tracking_uri']}")


def cmd_predict(args: argparse.Namespace) -> None:
    if args.out:
        from vitlab.deploy import batch, outputs

        outputs.check_out(args.out, args.overwrite)  # before the model loads
        bundle = load_bundle(args.model, args.tracking_uri)
        summary = batch.batch_predict(bundle, args.images, args.out, top_k=args.top_k, batch_size=args.batch_size,
                                      split=args.split, actors=args.actors, threads=args.threads,
                                      overwrite=args.overwrite, compute=args.compute)
        write_json(args.output_json, summary)
        print(batch.format_summary(summary))
        return
    from vitlab.deploy.batch import is_dataset

    for d in args.images:
        if is_dataset(d):
            raise UserError(f"{d}: a prepared dataset; predict its shards with --out PREDICTIONS (Ray Data)")
    bundle = load_bundle(args.model, args.tracking_uri)
    report = predict.predict(bundle, args.images, top_k=args.top_k, batch_size=args.batch_size)
    for r in report["results"]:
        if "error" in r:
            print(f"vitlab: {r['path']}: {r['error']}", file=sys.stderr)
    write_json(args.output_json, report)
    print(predict.format_predictions(report))


def cmd_bench_infer(args: argparse.Namespace) -> None:
    report = bench_infer.bench_infer(model_name=args.model, image_size=args.image_size, batch_size=args.batch_size,
                                     threads=args.threads, iters=args.iters, compile=not args.no_compile,
                                     quick=args.quick, opset=args.opset, runtimes=args.runtime)
    write_json(args.output_json, report)
    print(bench_infer.format_report(report))


def cmd_bench_train(args: argparse.Namespace) -> None:
    if args.device == "cuda":
        from vitlab.bench.train_gpu import bench_train_gpu, format_report

        for flag in ("threads", "windows"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag}: a flag of the CPU benchmark; --device cuda times one GPU in one window")
        report = bench_train_gpu(model_name=args.model, image_size=args.image_size, batch_size=args.batch_size,
                                 steps=args.steps, warmup=args.warmup, quick=args.quick)
    else:
        from vitlab.bench.train import bench_train, format_report

        given = {k: v for k, v in (("model_name", args.model), ("image_size", args.image_size),
                                   ("batch_size", args.batch_size)) if v is not None}  # else bench_train's defaults
        report = bench_train(**given, steps=args.steps, warmup=args.warmup, threads=args.threads,
                             windows=args.windows, quick=args.quick)
    write_json(args.output_json, report)
    print(format_report(report))


def cmd_bench_predict(args: argparse.Namespace) -> None:
    from vitlab.bench.predict import bench_predict, format_report

    report = bench_predict(source=args.source, images=args.images, model_name=args.model,
                           image_size=args.image_size, batch_size=args.batch_size, quick=args.quick,
                           runtime=args.runtime, compute=args.compute)
    write_json(args.output_json, report)
    print(format_report(report))
