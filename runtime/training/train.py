"""The worker: ``python -m runtime.training.train SPEC [options]``, started by torchrun's elastic agent
(``kubeforge-train``). Resumes from the latest checkpoint, trains, checkpoints, reports, logs the final
model."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from crds.trainingjob import TrainingJobSpec, TrainingProgress
from runtime.training.checkpoint import (
    CheckpointManager,
    ModelState,
    OptimizerState,
    TrainState,
    load_model_weights,
)
from runtime.training.data import step_batches
from runtime.training.job import build_job
from runtime.training.metrics import MetricsFile, ProfileWindow, Throughput, peak_flops
from runtime.training.parallel.dims import LayoutError
from runtime.training.parallel.materialize import materialize
from runtime.training.progress import FileSink, PodAnnotationSink, ProgressPublisher, Sink, TerminalBar
from runtime.training.protocol import EntryPointError
from runtime.training.spec import load_spec
from runtime.training.tracking import Tracker, make_tracker

log = logging.getLogger("kubeforge.train")
EXIT_USER_ERROR = 2
_stop = {"signal": 0}


def _on_signal(signum: int, _frame: Any) -> None:
    _stop["signal"] = signum


def train(spec: TrainingJobSpec, args: argparse.Namespace) -> int:
    rank0 = int(os.environ.get("RANK", "0")) == 0
    ckdir = Path(spec.checkpoint.path)
    tracker = make_tracker(spec, ckdir, os.environ.get("KUBEFORGE_JOB_NAME", "train")) if rank0 else Tracker()
    job = build_job(spec, keep_plain_copy=rank0 and tracker.run_id is not None)
    dims, o = job.dims, spec.optimizer
    state = TrainState(loss_scale=job.loss_scale)
    gloo = (
        dist.new_group(backend="gloo") if spec.checkpoint.async_save and job.device.type == "cuda" else None
    )
    ckpt = CheckpointManager(
        ckdir,
        spec.checkpoint.interval_steps,
        spec.checkpoint.keep,
        spec.checkpoint.async_save,
        {"model": ModelState(job.parts), "optim": OptimizerState(job.parts, job.optimizers), "train": state},
        process_group=gloo,
    )
    start = 0 if args.no_checkpoint else ckpt.resume()
    job.loss_scale = state.loss_scale
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    progress = TrainingProgress(
        step=start,
        total_steps=o.steps,
        world_size=dims.world_size,
        restarts=restarts,
        run_id=tracker.run_id,
        run_url=tracker.run_url,
        last_checkpoint=ckpt.last_path,
        last_checkpoint_step=ckpt.last_step,
    )
    sinks: list[Sink] = [s for s in (PodAnnotationSink.from_env(),) if s is not None]
    sinks += [FileSink(args.progress_file)] if args.progress_file else []
    sinks += [TerminalBar()] if args.bar else []
    publisher = ProgressPublisher(sinks if rank0 else [], args.progress_interval)
    mfile = MetricsFile(args.metrics_file if rank0 else None)
    mfile.write(
        {
            "event": "start",
            "step": start,
            "world_size": dims.world_size,
            "restarts": restarts,
            "layout": dims.describe(),
        }
    )
    if rank0:
        log.info("%s; %s from step %d", job.task.name, dims.describe(), start)
        tracker.log_params(
            {
                "layout": dims.describe(),
                "world_size": dims.world_size,
                **job.task.params,
                **{f"optimizer.{k}": v for k, v in o.model_dump().items()},
                "precision": spec.precision,
                "compression": spec.gradient_compression,
            }
        )
    publisher.publish(progress, force=True)
    signal.signal(signal.SIGTERM, _on_signal)
    prof = (
        ProfileWindow(spec.profiling.start_step, spec.profiling.steps, ckdir / "profile", job.device)
        if spec.profiling and rank0
        else None
    )
    tput, peak = Throughput(), peak_flops(job.device, str(spec.precision))
    stop_at = min(o.steps, args.stop_at_step or o.steps)
    batches = step_batches(
        job.task.dataset,
        o.global_batch_size,
        job.dp_rank,
        dims.dp,
        o.seed,
        start,
        stop_at,
        spec.data.num_workers,
    )
    tput.mark(0)
    for step, (x, y) in enumerate(batches, start=start + 1):
        if prof:
            prof.before_step(step)
        loss, norm, stepped = job.train_step(step, x, y)
        state.step, state.loss_scale, state.samples = (
            step,
            job.loss_scale,
            state.samples + o.global_batch_size,
        )
        tput.mark(o.global_batch_size)
        last = step == stop_at
        saving = (ckpt.due(step) or last) and not args.no_checkpoint
        if step % args.log_every == 0 or saving or last:
            vec = torch.tensor(
                [
                    float(loss) if loss is not None and job.reports_loss else 0.0,
                    1.0 if loss is not None and job.reports_loss else 0.0,
                    float(_stop["signal"]),
                ],
                dtype=torch.float64,
                device=job.device,
            )
            dist.all_reduce(vec)
            mean_loss = float(vec[0]) / max(float(vec[1]), 1.0)
            rate = tput.per_second()
            m = {"loss": mean_loss, "lr": job.optimizers[0].param_groups[0]["lr"], "grad_norm": float(norm)}
            if rate:
                m["samples_per_s"] = rate
                if job.task.tokens_per_sample:
                    m["tokens_per_s"] = rate * job.task.tokens_per_sample
                if peak and job.task.flops_per_sample:
                    m["mfu"] = rate * job.task.flops_per_sample / (peak * dims.world_size)
            if not stepped:
                m["skipped_step"] = 1.0
            mfile.write({"step": step, **m})
            tracker.log_metrics(m, step)
            progress = progress.model_copy(update={"step": step, "loss": mean_loss})
            if vec[2] > 0:
                _stop["signal"] = int(vec[2])
                saving = True
        if saving:
            path = ckpt.save(step, sync=last or bool(_stop["signal"]))
            tput.reset()  # the save is not training time
            tput.mark(0)
            mfile.write({"event": "checkpoint", "step": step, "path": path, "seconds": ckpt.last_seconds})
            tracker.log_metrics({"checkpoint_step": step, "checkpoint_seconds": ckpt.last_seconds}, step)
            progress = progress.model_copy(update={"last_checkpoint": path, "last_checkpoint_step": step})
        if prof:
            files = prof.after_step(step)
            if files:
                tracker.log_artifacts(files, "profile")
        publisher.publish(progress, force=saving or last)
        if _stop["signal"]:
            log.warning("signal %d: saved step %d, stopping", _stop["signal"], step)
            mfile.write({"event": "stopped", "step": step, "signal": _stop["signal"]})
            return 128 + _stop["signal"]
    ckpt.wait()
    done = stop_at >= o.steps
    if done and rank0 and job.plain_model is not None and ckpt.last_path:
        materialize(job.plain_model, torch.device("cpu"), job.task.init_weights)  # built on meta: storage
        load_model_weights(job.plain_model, ckpt.last_path)
        example = (
            job.task.example_input if job.task.example_input is not None else job.task.dataset[0][0][None]
        )
        uri = tracker.log_model(job.plain_model, example)
        progress = progress.model_copy(update={"model_uri": uri})
    final = progress.model_copy(
        update={
            "state": "succeeded" if done else "running",
            "message": None if done else f"stopped at step {stop_at} as asked",
        }
    )
    publisher.publish(final, force=True)
    mfile.write({"event": "finished" if done else "stopped", "step": stop_at})
    tracker.finish("succeeded" if done else "stopped")
    dist.barrier()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="runtime.training.train", description=__doc__)
    p.add_argument("spec", help="TrainingJob YAML/JSON (object or bare spec)")
    p.add_argument("--progress-file", default=None)
    p.add_argument("--progress-interval", type=float, default=5.0)
    p.add_argument("--metrics-file", default=None)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--stop-at-step", type=int, default=None)
    p.add_argument("--bar", action="store_true")
    p.add_argument("--no-checkpoint", action="store_true", help="neither resume nor save (benchmarks)")
    p.add_argument("--fatal-file", default=None, help="where a user error is recorded so restarts stop early")
    return p.parse_args(argv)


def _quiet_known_warnings() -> None:
    # Pipeline stages hand FSDP-wrapped outputs (views) on without in-place ops; the 2-D norm reduction of the
    # gradient norm is consistent across ranks (each step of it is one all-reduce over identical inputs).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _quiet_known_warnings()
    args = parse_args(argv)
    fatal = Path(args.fatal_file) if args.fatal_file else None
    if fatal is not None and fatal.is_file():  # a restart cannot fix a user error: fail again at once
        log.error("not retrying: %s", fatal.read_text())
        return EXIT_USER_ERROR
    spec = load_spec(args.spec)
    t0 = time.perf_counter()
    try:
        code = train(spec, args)
    except (EntryPointError, LayoutError) as e:
        log.error("%s", e)
        if fatal is not None:
            fatal.write_text(str(e))
        return EXIT_USER_ERROR
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    log.info("worker done in %.1f s", time.perf_counter() - t0)
    return code


def worker(argv: list[str]) -> None:
    """The elastic agent's entry point (forked or spawned): a non-zero code becomes the process exit code."""
    code = main(argv)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    sys.exit(main())
