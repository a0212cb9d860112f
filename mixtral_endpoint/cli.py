"""`mixtral-endpoint`: build the tiny model, package a checkpoint, regenerate the sample response."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from mixtral_endpoint.doors.score import serving as score_api
from mixtral_endpoint.protocol.config import ServerConfig
from mixtral_endpoint.protocol.errors import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixtral-endpoint", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("build-tiny", help="write the embedded tiny Mixtral checkpoint")
    tiny.add_argument("--out", type=Path, required=True)

    package = commands.add_parser("package", help="package a Mixtral checkpoint directory as an MLflow model")
    package.add_argument("--checkpoint", type=Path, required=True)
    package.add_argument("--out", type=Path, default=Path("model"))
    package.add_argument("--reference", action="store_true",
                         help="point at the checkpoint instead of copying it into the model")

    build = commands.add_parser("build-model", help="build the tiny Mixtral and package it into --out")
    build.add_argument("--out", type=Path, default=Path("model"))

    sample = commands.add_parser("sample-response", help="score a request file with the model, write the answer")
    sample.add_argument("--model", type=Path, default=Path("model"))
    sample.add_argument("--request", type=Path, default=Path("sample-request.json"))
    sample.add_argument("--out", type=Path, default=Path("sample-response.json"))

    commands.add_parser("swagger", help="write the parameters table into schemas/request.schema.json, then "
                        "swagger2.json and swagger3.json from schemas/")

    sizing = commands.add_parser("plan", help="size a checkpoint for a machine from config and safetensors headers")
    sizing.add_argument("--checkpoint", type=Path, required=True)
    sizing.add_argument("--gpus", type=int, default=0, help="GPUs per instance (0: CPU only)")
    sizing.add_argument("--gpu-memory", default="80GiB", help="memory of each GPU, e.g. 80GiB")
    sizing.add_argument("--cpu-memory", default="0", help="CPU memory for offloaded weights (CPU only: all of it)")
    sizing.add_argument("--disk", default="0", help="disk for offloaded weights")
    sizing.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    sizing.add_argument("--batch", type=int, default=8, help="rows generated together (MIXTRAL_MAX_BATCH_SIZE)")
    sizing.add_argument("--tokens", type=int, default=0, help="tokens per row (default: the context window)")
    sizing.add_argument("--prompt-tokens", type=int, default=0,
                        help="with --new-tokens: how many rows of this prompt + output length vLLM's cache holds")
    sizing.add_argument("--new-tokens", type=int, default=0, help="output tokens of each row (max_new_tokens)")
    sizing.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "bfloat16", "float16", "fp8"),
                        help="vLLM's KV cache dtype (auto: --dtype; fp8 halves it)")
    sizing.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="share of each GPU vLLM may take (vLLM's gpu_memory_utilization)")

    batch = commands.add_parser("batch", help="score JSONL files, one request per line; resumable")
    batch.add_argument("inputs", nargs="+", help="JSONL files: one request per line, optionally with an id")
    batch.add_argument("--output", type=Path, required=True, help="JSONL rows; rerun with the same arguments to resume")
    batch.add_argument("--model", type=Path, default=Path("model"))
    batch.add_argument("--workers", type=int, default=0, help="lines in flight (default: batch size + queue)")
    batch.add_argument("--no-progress", action="store_true")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _build_tiny(args: argparse.Namespace) -> int:
    from mixtral_endpoint.model.tiny import build_tiny

    print(build_tiny(args.out))
    return 0


def _package(args: argparse.Namespace) -> int:
    from mixtral_endpoint.doors.mlflow_model.packager import package_model

    print(package_model(args.checkpoint, args.out, reference=args.reference))
    return 0


def _build_model(args: argparse.Namespace) -> int:
    from mixtral_endpoint.doors.mlflow_model.packager import package_model
    from mixtral_endpoint.model.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        print(package_model(build_tiny(Path(tmp) / "tiny-mixtral"), args.out))
    return 0


def _sample_response(args: argparse.Namespace) -> int:
    from mixtral_endpoint.doors.mlflow_model.pyfunc import load_scorer

    scorer = load_scorer(args.model, ServerConfig.from_env(os.environ))
    response = score_api.score(scorer, json.loads(args.request.read_text()))
    args.out.write_text(json.dumps(response, indent=2, ensure_ascii=False) + "\n")
    print(args.out)
    return 0


def _swagger(args: argparse.Namespace) -> int:
    from mixtral_endpoint.doors.swagger import write_request_schema, write_swagger

    for path in [write_request_schema(), *write_swagger()]:
        print(path)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from accelerate.utils import convert_file_size_to_int

    from mixtral_endpoint.model.checkpoint import inspect_checkpoint
    from mixtral_endpoint.model.placement import (
        TYPICAL_ROW_TOKENS,
        Devices,
        describe,
        describe_kv,
        describe_replicas,
        kv_budget,
        plan,
        replica_plan,
    )

    checkpoint = inspect_checkpoint(args.checkpoint)
    tokens = args.tokens or checkpoint.context_window
    def nbytes(text: str) -> int:
        return int(text) if text.isdigit() else convert_file_size_to_int(text)

    devices = Devices((nbytes(args.gpu_memory),) * args.gpus, nbytes(args.cpu_memory), nbytes(args.disk))
    result = plan(checkpoint, devices, dtype=args.dtype, rows=args.batch, tokens=tokens)
    print(describe(checkpoint, devices, result, rows=args.batch, tokens=tokens))
    if args.gpus > 1:  # vLLM replicas, one per gunicorn worker, each on its own group of GPUs
        row = (args.prompt_tokens + args.new_tokens) or TYPICAL_ROW_TOKENS
        replicas = replica_plan(checkpoint, gpus=args.gpus, gpu_bytes=devices.gpu_bytes[0], dtype=args.dtype,
                                kv_cache_dtype=args.kv_cache_dtype, memory_share=args.gpu_memory_utilization,
                                row_tokens=row)
        print(describe_replicas(replicas, gpus=args.gpus, max_queue=ServerConfig().max_queue, row_tokens=row))
    if not (args.prompt_tokens or args.new_tokens):
        return 0 if result.fits else 1
    # vLLM's cache: the share of each GPU it takes, less the weights; the rows x context plan above is our engine's.
    share = Devices(tuple(int(g * args.gpu_memory_utilization) for g in devices.gpu_bytes), devices.cpu_bytes)
    row = args.prompt_tokens + args.new_tokens
    budget = kv_budget(checkpoint, share, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, row_tokens=row)
    print(describe_kv(checkpoint, share, budget, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
                      prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens))
    return 0 if budget.tokens >= row else 1


def _batch(args: argparse.Namespace) -> int:
    from mixtral_endpoint.doors.batch import default_workers, run_local
    from mixtral_endpoint.doors.mlflow_model.pyfunc import load_scorer

    config = ServerConfig.from_env(os.environ)
    scorer = load_scorer(args.model, config)
    workers = args.workers or default_workers(scorer)
    summary = run_local(scorer, args.inputs, args.output, workers=workers, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


_COMMANDS = {
    "build-tiny": _build_tiny,
    "package": _package,
    "build-model": _build_model,
    "sample-response": _sample_response,
    "swagger": _swagger,
    "batch": _batch,
    "plan": _plan,
}
