"""`kubeforge-serve`: `compile` (the InferenceService's init container) and `serve` (its main container).

    kubeforge-serve compile --model-uri models:/iris@champion --cache-dir /var/cache/kubeforge
    kubeforge-serve serve   --model-uri models:/iris@champion --cache-dir /var/cache/kubeforge \\
        --http-port 8080 --grpc-port 8081 --max-batch-size 32 --max-delay-ms 2 --max-queue-size 1024

`--spec file.yaml` reads an InferenceService (the whole object or its spec) for defaults; flags override it.
MLflow is reached through the usual MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI environment.
Exit codes: 0 ok, 2 bad arguments, 3 backend unavailable, 4 model cannot be loaded, 5 compile check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from runtime.serving.config import ServeConfig
from runtime.serving.signature import TensorSpec

D = ServeConfig  # every flag's default is the config field's
MB = 1 << 20

log = logging.getLogger("runtime.serving.cli")
T0 = time.time()


def _spec_defaults(path: str) -> dict[str, Any]:
    """Flag defaults from an InferenceService YAML (validated by crds.inferenceservice)."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SystemExit(f"kubeforge-serve: --spec {path}: cannot read it as YAML: {e}") from None
    spec = doc.get("spec", doc) if isinstance(doc, dict) else None
    if not isinstance(spec, dict):
        raise SystemExit(f"kubeforge-serve: --spec {path}: not an InferenceService or its spec")
    from pydantic import ValidationError

    from crds import validation
    from crds.inferenceservice import InferenceServiceSpec

    try:
        s = InferenceServiceSpec.model_validate(spec).model_dump()
    except ValidationError:  # said in the API server's own words, each naming its field
        problems = validation.errors({"kind": "InferenceService", "spec": spec})
        raise SystemExit(f"kubeforge-serve: --spec {path}: " + "; ".join(problems)) from None
    out: dict[str, Any] = {
        "backend": s["compile"]["backend"],
        "mode": s["compile"]["mode"],
        "warmup_batch_sizes": ",".join(str(b) for b in s["compile"]["warmup_batch_sizes"]),
        "max_batch_size": s["batching"]["max_batch_size"],
        "max_delay_ms": s["batching"]["max_delay_ms"],
        "max_queue_size": s["batching"]["max_queue_size"],
        "queue_timeout_ms": s["batching"]["queue_timeout_ms"],
        "lifo_after_ms": s["batching"]["lifo_after_ms"],
        "priority_levels": s["batching"]["priority_levels"],
        "default_priority_level": s["batching"]["default_priority_level"],
        "http_port": s["ports"]["http"],
        "grpc_port": s["ports"]["grpc"],
    }
    if s["model"].get("uri"):
        out["model_uri"] = s["model"]["uri"]
    if isinstance(doc, dict) and doc.get("metadata", {}).get("name") and not s["model"].get("uri"):
        out["model_name"] = doc["metadata"]["name"]
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kubeforge-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and compilation")
    g.add_argument(
        "--spec", help="InferenceService YAML (object or spec) giving defaults for the flags below"
    )
    g.add_argument(
        "--model-uri", help="models:/name@alias, models:/name/N, runs:/<run>/model, or a local path"
    )
    g.add_argument("--model-name", help="name to serve under (default: the registered model name)")
    g.add_argument(
        "--cache-dir",
        type=Path,
        default=os.environ.get("KUBEFORGE_CACHE_DIR"),
        help="compile cache folder (shared volume); unset: no cache, aot falls back to jit",
    )
    g.add_argument(
        "--backend",
        default=D.backend,
        choices=["auto", "cuda", "tensorrt", "rocm", "npu", "mlu", "cpu", "eager"],
    )
    g.add_argument("--mode", default=D.mode, choices=["aot", "jit", "eager"])
    g.add_argument(
        "--warmup-batch-sizes",
        default=",".join(map(str, D.warmup_batch_sizes)),
        help="comma-separated; compiled and checked vs eager",
    )
    g.add_argument("--max-batch-size", type=_positive, default=D.max_batch_size)
    g.add_argument("--precision", default=D.precision, choices=["fp32", "fp16", "bf16"])
    g.add_argument(
        "--strict", action="store_true", help="fail instead of falling back to eager on a bad check"
    )
    g.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME:DATATYPE:DIMS",
        help="input spec when the model has no signature, e.g. x:FP32:-1,16 (repeatable)",
    )
    g.add_argument("--output", action="append", default=[], metavar="NAME:DATATYPE:DIMS")
    g.add_argument("--log-format", default="json", choices=["json", "text"])
    g.add_argument(
        "--log-level",
        default=D.log_level,
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        help="the least severe level logged at start (debug: a line per answered request too); changed while "
        "running with Triton's log settings (--allow-log-settings)",
    )
    g.add_argument(
        "--torch-threads",
        type=int,
        default=D.torch_threads,
        help="intra-op threads of the model (default 0: all CPUs allowed but one on a CPU, 4 on an "
        "accelerator; the CPUs allowed are the affinity and the pod's CPU limit, not the node's cores)",
    )
    c = sub.add_parser("compile", parents=[common], help="compile into the cache and exit (init container)")
    c.add_argument(
        "--termination-log",
        type=Path,
        help="also write the compile summary (JSON), or the error, to this file: Kubernetes' termination"
        " message (/dev/termination-log), which the operator reads into the InferenceService's status",
    )
    s = sub.add_parser("serve", parents=[common], help="serve over REST and gRPC")
    s.add_argument("--host", default=D.host)
    s.add_argument("--http-port", type=int, default=D.http_port)
    s.add_argument("--grpc-port", type=int, default=D.grpc_port)
    s.add_argument("--max-delay-ms", type=_milliseconds, default=D.max_delay_ms)
    s.add_argument("--max-queue-size", type=_positive, default=D.max_queue_size)
    s.add_argument(
        "--queue-timeout-ms",
        type=_milliseconds,
        default=D.queue_timeout_ms,
        help="the longest a request waits in the queue; past it it is dropped unrun with 504 / "
        "DEADLINE_EXCEEDED (0: no limit). A client's own deadline (Triton's `timeout` parameter, "
        "grpc-timeout) applies as well",
    )
    s.add_argument(
        "--lifo-after-ms",
        type=_milliseconds,
        default=D.lifo_after_ms,
        help="overload: once the oldest queued request has waited this long, batches take the newest "
        "requests first, whose clients are most likely still waiting (0: always oldest first)",
    )
    s.add_argument(
        "--priority-levels",
        type=_count,
        default=D.priority_levels,
        help="levels of Triton's `priority` request parameter, 1 the most urgent: batches take the most "
        "urgent requests first, and a full queue refuses the least urgent first (0: none, the parameter "
        "is ignored)",
    )
    s.add_argument(
        "--default-priority-level",
        type=_count,
        default=D.default_priority_level,
        help="the level of a request that names none, or one past the last (0: the last, least urgent)",
    )
    s.add_argument(
        "--pad-multiple",
        type=int,
        default=D.pad_multiple,
        help="pad variable non-batch dims (sequence lengths) up to a multiple, for fewer shapes",
    )
    s.add_argument(
        "--workers",
        default="auto",
        help="protocol worker processes sharing the ports, handing tensors to the model process through "
        "shared memory; 0: one event loop in the model process; auto: 0 on a CPU-only machine, else half "
        "the cores (at most 8)",
    )
    s.add_argument(
        "--balance",
        default=D.balance,
        choices=["least-connections", "kernel"],
        help="how client connections reach 2+ protocol workers: least-connections (the model process "
        "accepts each and deals it to the worker holding the fewest) or kernel (every worker listens, "
        "SO_REUSEPORT: a hash of the client's address picks one, however loaded; no hop for clients that "
        "open a connection per request)",
    )
    s.add_argument(
        "--max-payload-mb",
        type=float,
        default=D.max_payload_bytes / MB,
        help="largest request body (413 past it)",
    )
    s.add_argument(
        "--max-inflight-mb",
        type=float,
        default=D.max_inflight_bytes / MB,
        help="request bytes one process (the server, or each protocol worker) holds at once for requests "
        "being received, queued or answered; past it new requests get 429 / RESOURCE_EXHAUSTED "
        "(0: 4 x --max-payload-mb)",
    )
    s.add_argument(
        "--grpc-server",
        default=D.grpc_server,
        choices=["native", "grpcio"],
        help="gRPC over our own HTTP/2 (native: unary calls, no TLS or compression) or grpcio's grpc.aio",
    )
    s.add_argument(
        "--event-loop",
        default=D.event_loop,
        choices=["auto", "asyncio", "uvloop"],
        help="the event loop of the processes that serve REST and gRPC: asyncio's own, or uvloop's (libuv; "
        "needs the uvloop package, which the serving extra installs); auto (the default): uvloop's when "
        "installed. On a lent GPU host uvloop took 17 %% off a worker's CPU per gRPC request "
        "(docs/serving.md)",
    )
    s.add_argument(
        "--busy-poll-us",
        type=_busy_poll,
        default=D.busy_poll_us,
        help="poll before sleeping, at light load: how many microseconds a protocol worker, and the model "
        "process's batcher thread when no batch is in flight, keep polling for the message they expect "
        "next before they sleep (0: sleep at once). auto (the default): 2000 next to an accelerator when "
        "the CPUs allowed (affinity, CPU limit) cover the workers + 2, else 0. Trades CPU for batch-1 "
        "latency: -0.5 ms on a lent H100 host (docs/serving.md)",
    )
    s.add_argument(
        "--allow-client-shm",
        action="store_true",
        help="let clients register system shared memory regions and pass tensors through them (Triton's "
        "extension and flag; for clients on the same host, such as a sidecar sharing the pod's /dev/shm). "
        "Off by default: a client that may register regions may read and write any shared memory object "
        "of the server's user",
    )
    s.add_argument(
        "--allow-log-settings",
        action="store_true",
        help="let clients change the log settings (Triton's logging extension: POST v2/logging, gRPC "
        "LogSettings; e.g. log_verbose_level 1 for a debug line per request) while the server runs. Off "
        "by default: a client that may can turn the error logs off, or flood them. Reading them is always "
        "allowed",
    )
    s.add_argument(
        "--launch-deviations",
        type=_deviations,
        default=D.launch_deviations,
        help="GPUs: a batch's launch starts this many mean deviations of the launches' seconds, beside "
        "their mean, before the device is expected to be free (0: the mean alone). Larger: fewer idle gaps "
        "behind a slow launch, batches a little smaller (docs/serving.md)",
    )
    s.add_argument(
        "--copy-stream",
        action=argparse.BooleanOptionalAction,
        default=D.copy_stream,
        help="CUDA: copy inputs to the GPU on a stream of their own, overlapping the batch before (on by "
        "default: ResNet-50 on an H100 at 128 clients, +26 %% rows/s; --no-copy-stream: one stream; "
        "docs/serving.md)",
    )
    s.add_argument(
        "--drain-delay-s",
        type=float,
        default=D.drain_delay_s,
        help="after SIGTERM, keep serving (readiness 503) this long before closing the listeners",
    )
    s.add_argument(
        "--grace-s", type=float, default=D.grace_s, help="longest wait for in-flight requests to finish"
    )
    return p


def _config(args: argparse.Namespace) -> Any:
    if not args.model_uri:
        raise SystemExit("kubeforge-serve: --model-uri (or a --spec with spec.model.uri) is required")
    try:
        sizes = tuple(int(b) for b in str(args.warmup_batch_sizes).split(",") if b.strip())
        inputs = tuple(TensorSpec.parse(t) for t in args.input)
        outputs = tuple(TensorSpec.parse(t) for t in args.output)
    except ValueError as e:
        raise SystemExit(f"kubeforge-serve: {e}") from None
    kw: dict[str, Any] = dict(
        model_uri=args.model_uri,
        model_name=args.model_name,
        cache_dir=args.cache_dir,
        backend=args.backend,
        mode=args.mode,
        warmup_batch_sizes=sizes,
        precision=args.precision,
        strict=args.strict,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=args.max_batch_size,
        started=T0,
        torch_threads=args.torch_threads,
    )
    if args.command == "serve":
        if not 0 <= args.default_priority_level <= args.priority_levels:
            raise SystemExit(
                f"kubeforge-serve: --default-priority-level {args.default_priority_level} must be between 1"
                f" and --priority-levels ({args.priority_levels}), or 0 for the last level"
            )
        kw.update(
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            max_delay_ms=args.max_delay_ms,
            max_queue_size=args.max_queue_size,
            queue_timeout_ms=args.queue_timeout_ms,
            lifo_after_ms=args.lifo_after_ms,
            priority_levels=args.priority_levels,
            default_priority_level=args.default_priority_level,
            pad_multiple=args.pad_multiple,
            max_payload_bytes=int(args.max_payload_mb * MB),
            max_inflight_bytes=int(args.max_inflight_mb * MB),
            drain_delay_s=args.drain_delay_s,
            grace_s=args.grace_s,
            workers=_workers(args.workers),
            balance=args.balance,
            log_level=args.log_level,
            copy_stream=args.copy_stream,
            launch_deviations=args.launch_deviations,
            grpc_server=args.grpc_server,
            event_loop=args.event_loop,
            busy_poll_us=args.busy_poll_us,
            allow_client_shm=args.allow_client_shm,
            allow_log_settings=args.allow_log_settings,
        )
    return ServeConfig(**kw)


def _milliseconds(value: str) -> float:
    """A duration flag: milliseconds >= 0 (argparse names the flag in its error)."""
    try:
        ms = float(value)
    except ValueError:
        ms = -1.0
    if not ms >= 0 or ms == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration in milliseconds >= 0 (0: off)")
    return ms


def _deviations(value: str) -> float:
    """--launch-deviations: a number of deviations, 0 to 10 (argparse names the flag in its error)."""
    try:
        n = float(value)
    except ValueError:
        n = -1.0
    if not 0 <= n <= 10:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of deviations from 0 to 10 (default 2)")
    return n


def _busy_poll(value: str) -> float | None:
    """--busy-poll-us: auto (None) or microseconds, 0 to 10,000 (argparse names the flag in its error)."""
    if value == "auto":
        return None
    try:
        n = float(value)
    except ValueError:
        n = -1.0
    if not 0 <= n <= 10_000:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not auto or a number of microseconds from 0 to 10000 (0: no polling)"
        )
    return n


def _count(value: str, least: int = 0) -> int:
    """A whole number >= `least` (argparse names the flag in its error)."""
    try:
        n = int(value)
    except ValueError:
        n = least - 1
    if n < least:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= {least}")
    return n


def _positive(value: str) -> int:
    return _count(value, 1)


def _workers(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        return _count(value)
    except argparse.ArgumentTypeError:
        raise SystemExit(
            f"kubeforge-serve: --workers {value!r} must be auto or a whole number >= 0"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.spec:
        parser.set_defaults(**_spec_defaults(args.spec))
        for sp in parser._subparsers._group_actions[0].choices.values():  # type: ignore[union-attr]
            sp.set_defaults(**_spec_defaults(args.spec))
        args = parser.parse_args(argv)
    if getattr(args, "event_loop", "asyncio") == "uvloop" and importlib.util.find_spec("uvloop") is None:
        parser.error(
            "--event-loop uvloop: the Python package uvloop is not installed; pip install uvloop (the "
            "serving extra, kubeforge[serving], includes it), or set --event-loop to auto or asyncio"
        )
    from runtime.serving.logs import setup_logging

    setup_logging(args.log_level, json=args.log_format == "json")
    if args.cache_dir:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(args.cache_dir / "inductor"))
        os.environ.setdefault("TRITON_CACHE_DIR", str(args.cache_dir / "triton"))
    import torch

    if args.torch_threads and args.command == "compile":
        torch.set_num_threads(args.torch_threads)
    from runtime.serving.compile import BackendUnavailable
    from runtime.serving.loader import ModelLoadError

    cfg = _config(args)
    try:
        if args.command == "compile":
            from runtime.serving.server import build_info, prepare

            p = prepare(cfg)
            info = {
                "model": p.loaded.name,
                "version": p.loaded.version,
                **build_info(p.build),
                "seconds_since_start": round(time.time() - T0, 3),
            }
            print(json.dumps(info, default=str))
            _termination_message(args, json.dumps(info, default=str))
            return 0
        from runtime.serving.server import Server, event_loop_kind, run_event_loop

        if cfg.event_loop == "auto" and event_loop_kind("auto") == "asyncio":
            log.info(
                "uvloop is not installed: REST and gRPC are served on asyncio's event loop (pip install"
                " uvloop, in the serving extra, for less CPU per gRPC request)"
            )
        server = Server(cfg)
        run_event_loop(server.run(), cfg.event_loop)
        if server.error is not None:
            raise server.error
        return 0
    except BackendUnavailable as e:
        log.error("backend unavailable", extra={"error": str(e)})
        return _fail(args, f"kubeforge-serve: {e}", 3)
    except ModelLoadError as e:
        log.error("model cannot be loaded", extra={"error": str(e)})
        return _fail(args, f"kubeforge-serve: {e}", 4)
    except AssertionError as e:
        from runtime.serving.compile import describe

        return _fail(
            args, f"kubeforge-serve: compiled model failed its check against eager: {describe(e)}", 5
        )


def _termination_message(args: argparse.Namespace, text: str) -> None:
    """Kubernetes keeps at most 4,096 bytes of a termination message: the start of `text` then."""
    path = getattr(args, "termination_log", None)
    if path is None:
        return
    try:
        path.write_bytes(text.encode()[:4096])
    except OSError as e:
        log.warning("cannot write the termination message", extra={"path": str(path), "error": str(e)})


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    print(message, file=sys.stderr)
    _termination_message(args, message)
    return code


if __name__ == "__main__":
    sys.exit(main())
