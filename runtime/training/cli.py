"""``kubeforge-train``: run a TrainingJob spec through PyTorch's elastic agent (torchrun's machinery).

In a pod (the operator's command) the agent's settings come from torchrun's ``PET_*`` variables: PET_NNODES
(min:max), PET_NPROC_PER_NODE, PET_RDZV_ENDPOINT, PET_RDZV_BACKEND, PET_RDZV_ID, PET_MAX_RESTARTS.
With ``--local`` the same spec runs on this machine: one node, c10d rendezvous on 127.0.0.1.

The layout and the entry point are checked here, before any worker starts, so mistakes fail in a second
with a message naming the field (exit code 2: not retried by the operator).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from crds.common import SPEC_FILE_NAME, SPEC_MOUNT_DIR
from crds.trainingjob import TrainingJobSpec, TrainingProgress
from runtime.cpus import cpus_allowed
from runtime.training.parallel.dims import LayoutError, validate_range
from runtime.training.progress import FileSink, write_termination_log
from runtime.training.protocol import EntryPointError
from runtime.training.spec import load_spec, write_spec

log = logging.getLogger("kubeforge.launch")
EXIT_USER_ERROR = 2


def _default_start_method() -> str:
    """fork reuses the agent's imported torch (workers start in milliseconds) but is unsafe once a CUDA driver
    is loaded in the agent; GPU nodes spawn fresh interpreters."""
    gpu = any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/kfd", "/dev/davinci_manager"))
    return "spawn" if gpu else "fork"


def _nnodes(value: str) -> tuple[int, int]:
    lo, _, hi = value.partition(":")
    return int(lo), int(hi or lo)


def validate(spec: TrainingJobSpec, min_nodes: int, max_nodes: int, nproc: int) -> None:
    """Everything that can be checked without starting a worker: layout at each world size, model options,
    the user's entry point (imported, not called)."""
    validate_range(spec, min_nodes, max_nodes, nproc)
    if spec.model.entrypoint:
        from runtime.training.protocol import resolve_entrypoint

        resolve_entrypoint(spec.model.entrypoint)
    elif str(spec.model.builtin) == "llama":
        from runtime.training.models.llama import check_layout, llama_args

        par = spec.parallelism
        sp_len = spec.data.sequence_length if par.sequence_parallel else 0
        check_layout(llama_args(spec), par.tensor, par.pipeline * par.stages_per_rank, sp_len)
    elif spec.model.builtin is not None:
        from runtime.training.models.vision import WIDTHS

        if spec.model.preset not in WIDTHS:
            raise ValueError(f"spec.model.preset {spec.model.preset!r}: choose one of {sorted(WIDTHS)}")
        if spec.parallelism.tensor > 1 or spec.parallelism.pipeline > 1:
            raise LayoutError(
                f"model {spec.model.builtin} is data-parallel only; set parallelism.tensor: 1 and "
                "parallelism.pipeline: 1"
            )
    else:
        raise ValueError("spec.model needs builtin or entrypoint")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kubeforge-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("spec", nargs="?", default=f"{SPEC_MOUNT_DIR}/{SPEC_FILE_NAME}", help="TrainingJob YAML")
    p.add_argument("--local", action="store_true", help="run on this machine (c10d on 127.0.0.1)")
    p.add_argument(
        "--nproc-per-node", type=int, default=None, help="default: PET_NPROC_PER_NODE or the spec's"
    )
    p.add_argument("--max-restarts", type=int, default=None, help="default: PET_MAX_RESTARTS or the spec's")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set optimizer.steps=20 (repeatable)",
    )
    p.add_argument("--progress-file", default=None, help="write progress JSON here (default: a temp file)")
    p.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress reports")
    p.add_argument("--metrics-file", default=None, help="append per-step metrics and events (JSON lines)")
    p.add_argument("--log-every", type=int, default=1, help="steps between loss reductions / metric records")
    p.add_argument("--stop-at-step", type=int, default=None, help="checkpoint and stop after this step")
    p.add_argument("--no-checkpoint", action="store_true", help="neither resume nor save (benchmarks)")
    p.add_argument(
        "--start-method",
        choices=["fork", "spawn"],
        default=None,
        help="how workers start; default fork without GPUs (fast), spawn with them",
    )
    p.add_argument("--check", action="store_true", help="validate the spec and the layout, then exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    env = os.environ
    sets = list(args.set)
    if (
        args.local
    ):  # the spec runs on this one machine: one node of --nproc-per-node (or the spec's) processes
        sets = ["nodes={count: 1}", *sets]
    if args.nproc_per_node:
        sets = [f"processesPerNode={args.nproc_per_node}", *sets]
    try:
        spec = load_spec(args.spec, sets)
    except Exception as e:
        print(f"kubeforge-train: invalid spec {args.spec}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    nproc = args.nproc_per_node or int(env.get("PET_NPROC_PER_NODE", spec.processes_per_node))
    if args.local:
        min_nodes = max_nodes = 1
    else:
        default = f"{spec.nodes.min or spec.nodes.count}:{spec.nodes.max or spec.nodes.count}"
        min_nodes, max_nodes = _nnodes(env.get("PET_NNODES", default))
    try:
        validate(spec, min_nodes, max_nodes, nproc)
    except (LayoutError, EntryPointError, ValueError) as e:
        print(f"kubeforge-train: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.check:
        print(f"kubeforge-train: spec valid for {min_nodes}:{max_nodes} nodes x {nproc} processes")
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="kubeforge-train-"))  # the workers' spec, progress and fatal files
    try:
        return _launch(args, spec, tmp, min_nodes, max_nodes, nproc, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # each run left one behind


def _launch(
    args: argparse.Namespace,
    spec: TrainingJobSpec,
    tmp: Path,
    min_nodes: int,
    max_nodes: int,
    nproc: int,
    env: Mapping[str, str],
) -> int:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from runtime.training.stores import LOOPBACK, loopback_store

    spec_file = tmp / "spec.json"
    write_spec(spec, spec_file)
    progress_file = args.progress_file or str(tmp / "progress.json")
    max_restarts = (
        args.max_restarts
        if args.max_restarts is not None
        else int(env.get("PET_MAX_RESTARTS", spec.failure_policy.max_restarts))
    )
    rdzv_store = None
    if args.local:
        # the job's identity (PET_RDZV_ID: the MLflow run's job tag) is kept when given; the endpoint never.
        # The rendezvous store listens on 127.0.0.1 only (torch's would listen on every address).
        rdzv_store = loopback_store()
        endpoint, backend = f"{LOOPBACK}:{rdzv_store.port}", "c10d"
        run_id = env.get("PET_RDZV_ID") or f"local-{uuid.uuid4().hex[:8]}"
    else:
        endpoint = env.get("PET_RDZV_ENDPOINT", "127.0.0.1:29400")
        backend, run_id = env.get("PET_RDZV_BACKEND", "c10d"), env.get("PET_RDZV_ID", "kubeforge")
    config = LaunchConfig(
        # the agent's per-run log directory (workers' error files) goes with ours, not into /tmp for good
        logs_specs=DefaultLogsSpecs(log_dir=str(tmp / "elastic")),
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=nproc,
        run_id=run_id,
        rdzv_endpoint=endpoint,
        rdzv_backend=backend,
        rdzv_configs={"join_timeout": 600, "last_call_timeout": 30},
        max_restarts=max_restarts,
        monitor_interval=0.5,
        start_method=args.start_method or _default_start_method(),
        # the workers' MASTER_ADDR: 127.0.0.1 on one machine, where rank 0's store listens (job.py)
        local_addr=LOOPBACK if args.local else None,
    )
    worker_args = [
        str(spec_file),
        "--progress-file",
        progress_file,
        "--progress-interval",
        str(args.progress_interval),
        "--log-every",
        str(args.log_every),
    ]
    if args.metrics_file:
        worker_args += ["--metrics-file", args.metrics_file]
    if args.no_checkpoint:
        worker_args.append("--no-checkpoint")
    if args.stop_at_step:
        worker_args += ["--stop-at-step", str(args.stop_at_step)]
    if args.local and sys.stderr.isatty():
        worker_args.append("--bar")
    if config.start_method == "fork":  # import once here, so forked workers start with everything loaded
        _preload(spec)
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: no oversubscription of the CPUs allowed
        # (affinity, and the pod's CPU limit: the node's cores under a limit get the pod throttled)
        os.environ["OMP_NUM_THREADS"] = str(max(1, int(cpus_allowed()) // nproc))
    # The agent's shared TCPStore outlives a restart without a per-attempt key prefix, so re-formed workers
    # can read the dead group's gloo/NCCL addresses; a store per rendezvous round (hosted by rank 0)
    # avoids it.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    fatal = tmp / "fatal.txt"
    worker_args += ["--fatal-file", str(fatal)]
    log.info(
        "launching %s: nodes %d:%d x %d processes, rendezvous %s %s, %d restarts allowed",
        args.spec,
        min_nodes,
        max_nodes,
        nproc,
        backend,
        endpoint,
        max_restarts,
    )
    code = 0
    try:
        from runtime.training.train import worker

        elastic_launch(config, entrypoint=worker)(worker_args)
    except ChildFailedError as e:
        first = next(iter(e.failures.values()))
        code = first.exitcode if first.exitcode and first.exitcode > 0 else 1
        if fatal.is_file():
            print(f"kubeforge-train: {fatal.read_text()}", file=sys.stderr)
        else:
            log.error("training failed: %s", e.format_msg()[:2000])  # type: ignore[no-untyped-call]
    finally:
        del rdzv_store  # its server stops once torch's store objects on that port are gone too
    final = _final_progress(progress_file, code, fatal.read_text() if fatal.is_file() else None)
    write_termination_log(final)
    if code != 0:
        FileSink(progress_file).publish(final)
    print(json.dumps(final.to_wire()))
    return code


def _preload(spec: TrainingJobSpec) -> None:
    import torch.distributed.checkpoint
    import torch.distributed.fsdp
    import torch.distributed.pipelining  # noqa: F401

    import runtime.training.train  # noqa: F401

    if spec.model.builtin is not None:
        from runtime.training.models import llama, vision  # noqa: F401
    if str(spec.data.builtin) == "digits":
        import sklearn.datasets  # noqa: F401
    from runtime.training.tracking import tracking_uri

    if tracking_uri(spec):
        with contextlib.suppress(ImportError):
            import mlflow.pytorch  # noqa: F401


def _final_progress(path: str, code: int, fatal: str | None) -> TrainingProgress:
    try:
        p = TrainingProgress.model_validate_json(Path(path).read_text())
    except (OSError, ValueError):
        p = TrainingProgress()
    if code != 0:
        p = p.model_copy(update={"state": "failed", "message": fatal or f"workers failed (exit code {code})"})
    return p


if __name__ == "__main__":
    sys.exit(main())
