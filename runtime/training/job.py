"""Builds a worker's job from the spec: process group, mesh, model parts, optimizers, and one training
step."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._C._distributed_c10d import TCPStore
from torch.distributed.tensor import DTensor

from crds.trainingjob import TrainingJobSpec
from runtime.training.models import build_task
from runtime.training.parallel import data_parallel
from runtime.training.parallel.dims import ParallelDims, resolve
from runtime.training.parallel.materialize import materialize, to_device
from runtime.training.parallel.pipeline import Pipeline, build_pipeline
from runtime.training.protocol import EntryPointError, ParallelContext, TrainTask, check_task_supports
from runtime.training.stores import LOOPBACK, loopback_store

log = logging.getLogger("kubeforge.train")


def init_distributed(timeout_s: int = 600) -> torch.device:
    """Join the group torchrun's agent formed (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        _hold_loopback_store()
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return device


_held: list[TCPStore] = []  # rank 0's loopback store server, for as long as the process


def _hold_loopback_store() -> None:
    """On one machine (kubeforge-train --local: MASTER_ADDR 127.0.0.1), rank 0 starts the group's store
    server on 127.0.0.1 before init_process_group, which then uses it (runtime.training.stores). Not when the
    agent serves that store itself (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=0: its rendezvous store, on loopback
    already), and if the port cannot be had, torch starts its own as usual."""
    env = os.environ
    if env.get("MASTER_ADDR") != LOOPBACK or env.get("RANK") != "0":
        return
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    try:
        _held.append(loopback_store(int(env["MASTER_PORT"])))
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        log.warning("rank 0's store could not be kept to 127.0.0.1 (%s); torch starts its own", e)


def grad_norm(params: list[nn.Parameter], pp_group: Any) -> torch.Tensor:
    """Global L2 norm of the gradients over every parallel dimension. Grads of DTensor parameters are grouped
    by mesh and placement (one reduction each); plain (replicated) ones are local; pipeline stages
    all-reduce."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            g = p.grad
            key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else None
            groups.setdefault(key, []).append(g)
    sq: torch.Tensor | None = None
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        sq = n.float() ** 2 if sq is None else sq + n.float() ** 2
    if sq is None:
        sq = torch.zeros((), device=params[0].device if params else "cpu")
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    return sq.sqrt()


def lr_at(spec: TrainingJobSpec, step: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak at the last step (``step`` is 1-based)."""
    o = spec.optimizer
    if o.warmup_steps and step <= o.warmup_steps:
        return o.learning_rate * step / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps)
    return o.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class Job:
    spec: TrainingJobSpec
    dims: ParallelDims
    mesh: Any
    device: torch.device
    task: TrainTask
    parts: list[nn.Module]
    optimizers: list[torch.optim.Optimizer]
    pipeline: Pipeline | None
    plain_model: nn.Module | None  # an unparallelized copy (rank 0; meta until filled), to log the model
    loss_scale: float = 1.0
    good_steps: int = 0

    @property
    def dp_rank(self) -> int:
        return int(self.mesh["dp_replicate"].get_local_rank()) * self.dims.dp_shard + int(
            self.mesh["dp_shard"].get_local_rank()
        )

    @property
    def reports_loss(self) -> bool:
        """This rank holds a loss that counts: last pipeline stage, first tensor-parallel rank."""
        last = self.pipeline is None or self.pipeline.has_last
        return last and int(self.mesh["tp"].get_local_rank()) == 0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """Mixed precision without FSDP comes from autocast (FSDP2 casts parameters itself)."""
        return (
            None
            if self.dims.fsdp_enabled
            else {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.spec.precision))
        )

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        dt = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dt, enabled=dt is not None):
            yield

    def params(self) -> list[nn.Parameter]:
        return [p for m in self.parts for p in m.parameters()]

    def train_step(
        self, step: int, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor, bool]:
        """One optimizer step (1-based ``step``). Returns (this rank's loss or None, grad norm, stepped)."""
        if self.device.type == "cuda":  # pinned + non-blocking: no host sync, the CPU keeps running ahead
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        inputs = inputs.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        loss: torch.Tensor | None
        with self.autocast():
            if self.pipeline is not None:
                # the loss and its backward run inside the step, where the last stage's logits come
                # vocabulary-sharded whenever there is tensor parallelism
                with loss_context(self.dims.tp_enabled):
                    losses = self.pipeline.step(inputs, targets)
                losses = [x.full_tensor() if isinstance(x, DTensor) else x for x in losses]
                loss = (
                    torch.stack([x.detach().float() for x in losses]).mean() / self.loss_scale
                    if losses
                    else None
                )
            else:
                mb = self.dims.micro_batches
                total = torch.zeros((), device=self.device)
                for x, y in zip(inputs.chunk(mb), targets.chunk(mb), strict=True):
                    out = self.parts[0](x)
                    with loss_context(isinstance(out, DTensor)):
                        part = self.task.loss_fn(out, y) / mb
                        (part * self.loss_scale).backward()  # type: ignore[no-untyped-call]
                    part = part.full_tensor() if isinstance(part, DTensor) else part
                    total += part.detach().float()
                loss = total
        norm = grad_norm(self.params(), self.mesh["pp"].get_group() if self.dims.pp_enabled else None)
        norm = norm / self.loss_scale
        fp16 = str(self.spec.precision) == "fp16"
        finite = bool(torch.isfinite(norm)) if fp16 else True
        clip = self.spec.optimizer.grad_clip_norm
        coef = torch.full((), 1.0 / self.loss_scale, device=norm.device)
        if clip is not None:
            coef = coef * torch.clamp(clip / (norm + 1e-6), max=1.0)
        if finite:
            if clip is not None or self.loss_scale != 1.0:
                for p in self.params():
                    if p.grad is not None:
                        p.grad.mul_(coef.to(p.grad.device))
            lr = lr_at(self.spec, step)
            for o in self.optimizers:
                for g in o.param_groups:
                    g["lr"] = lr
                o.step()
        if fp16:  # dynamic loss scaling: halve on overflow, double after 1000 clean steps
            self.good_steps = self.good_steps + 1 if finite else 0
            if not finite:
                self.loss_scale = max(1.0, self.loss_scale / 2)
            elif self.good_steps % 1000 == 0:
                self.loss_scale *= 2
        return loss, norm, finite


def loss_context(sharded: bool) -> contextlib.AbstractContextManager[None]:
    """With logits that come vocabulary-sharded (a DTensor: ParallelContext.loss_parallel), the loss and its
    backward run under DTensor's loss_parallel: cross-entropy over the shards, the logits never gathered (ops
    on plain tensors are unaffected)."""
    if not sharded:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def _fill(module: nn.Module, device: torch.device, task: TrainTask) -> None:
    """parallel.materialize, its complaints about the task's init_weights a user error (no restart)."""
    try:
        materialize(module, device, task.init_weights)
    except ValueError as e:
        raise EntryPointError(f"TrainTask.init_weights: {e}") from e


def build_job(spec: TrainingJobSpec, *, keep_plain_copy: bool) -> Job:
    device = init_distributed()
    dims = resolve(spec, dist.get_world_size())
    mesh = dims.build_mesh(device.type)
    task = build_task(spec)
    check_task_supports(task, dims)
    plain = copy.deepcopy(task.model) if keep_plain_copy else None
    ctx = ParallelContext(
        dims=dims,
        mesh=mesh,
        device=device,
        precision=str(spec.precision),
        compression=str(spec.gradient_compression),
        power_sgd_rank=spec.power_sgd_rank,
        activation_checkpointing=str(spec.activation_checkpointing),
        compile=spec.compile,
        sequence_parallel=dims.sequence_parallel,
        loss_parallel=dims.tp_enabled,
        materialize=lambda module: _fill(module, device, task),
    )
    parallelize = task.parallelize or data_parallel.default_parallelize
    job = Job(
        spec,
        dims,
        mesh,
        device,
        task,
        [],
        [],
        None,
        plain,
        loss_scale=2.0**16 if str(spec.precision) == "fp16" else 1.0,
    )
    if dims.pp_enabled:
        assert task.split_pipeline is not None

        def pp_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return task.loss_fn(out, target) * job.loss_scale

        job.pipeline = build_pipeline(task.model, task.split_pipeline, parallelize, ctx, pp_loss)
        job.parts = job.pipeline.parts
    else:
        job.parts = [parallelize(to_device(task.model, device), ctx)]
        ctx.materialize(job.parts[0])
    o = spec.optimizer
    job.optimizers = [
        torch.optim.AdamW(
            m.parameters(),
            lr=o.learning_rate,
            betas=(0.9, 0.95),
            weight_decay=o.weight_decay,
            foreach=False if dims.tp_enabled else None,
        )
        for m in job.parts
    ]
    return job
