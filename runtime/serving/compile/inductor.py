"""Inductor helpers shared by the CPU, CUDA and ROCm backends: torch.export + AOTInductor packages, and
torch.compile with its portable cache artifacts."""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from runtime.serving.compile.base import Compiled, CompileRequest, Runner, as_tuple, call_module
from runtime.serving.compile.cache import CacheEntry
from runtime.serving.protocol import datatypes
from runtime.serving.signature import Signature

log = logging.getLogger(__name__)

VARIABLE_DIM_EXAMPLE = 8  # size used for variable non-batch dimensions in warm-up inputs
PACKAGE = "model.pt2"
PROBE_OK = "probe-ok.json"
JIT_ARTIFACTS = "jit-cache.bin"

# torch releases whose aoti_load_package is known to crash the process (measured: torch 2.11 on the H200
# image segfaulted loading a two-layer MLP package, on CPU and CUDA alike).
AOTI_LOAD_KNOWN_BAD = ("2.11.",)


def aoti_known_bad(version: str | None = None) -> str | None:
    v = version or torch.__version__
    if any(v.startswith(bad) for bad in AOTI_LOAD_KNOWN_BAD):
        return f"torch {v}: aoti_load_package is known to crash (segfault) on this release"
    return None


def example_inputs(sig: Signature, batch: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic warm-up inputs: floats ~N(0,1), integers in [0, 2) (safe as token ids), random bools."""
    g = torch.Generator().manual_seed(seed + batch)
    out = []
    for spec in sig.inputs:
        shape = [
            batch if i == 0 and d == -1 and sig.batched else (VARIABLE_DIM_EXAMPLE if d == -1 else d)
            for i, d in enumerate(spec.shape)
        ]
        dt = datatypes.lookup(spec.datatype).torch
        if dt.is_floating_point:
            t = torch.randn(shape, generator=g).to(dt)
        elif dt == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        else:
            t = torch.randint(0, 2, shape, generator=g).to(dt)
        out.append(t.to(device))
    return out


def _dynamic_shapes(sig: Signature, max_batch: int) -> tuple[dict[int, Any], ...]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=max(max_batch, 2))
    shapes = []
    for i, spec in enumerate(sig.inputs):
        dims: dict[int, Any] = {}
        for j, d in enumerate(spec.shape):
            if d == -1:
                dims[j] = batch if (j == 0 and sig.batched) else Dim(f"in{i}_d{j}", min=1, max=65536)
        shapes.append(dims)
    return tuple(shapes)


def aot_compile(req: CompileRequest, entry: CacheEntry) -> Path:
    """torch.export with a dynamic batch dimension → AOTInductor package in the cache entry."""
    examples = tuple(example_inputs(req.signature, max(2, min(req.max_batch_size, 4)), req.device.device))
    t0 = time.perf_counter()
    ep = torch.export.export(
        req.module, examples, dynamic_shapes=_dynamic_shapes(req.signature, req.max_batch_size), strict=False
    )
    tmp = entry.temp_path(PACKAGE).with_suffix(".pt2")
    torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
    path = entry.commit(tmp, PACKAGE)
    log.info(
        "aotinductor package written",
        extra={"path": str(path), "seconds": round(time.perf_counter() - t0, 2)},
    )
    return path


_PROBE = """
import json, sys, torch
from torch._inductor import aoti_load_package
spec = json.loads(sys.argv[2])
m = aoti_load_package(sys.argv[1])
xs = [torch.zeros(s, dtype=getattr(torch, d), device=spec["device"]) for s, d in spec["inputs"]]
with torch.inference_mode():
    m(*xs)
print("probe ok")
"""


def probe_package(entry: CacheEntry, req: CompileRequest, timeout: float = 300) -> str | None:
    """Load and run the package once in a subprocess; None when it works, else why it does not.

    A crash in aoti_load_package kills the process (segfault), so it is tried in a child first. The result is
    remembered in the cache entry, so later starts skip the probe.
    """
    if entry.has(PROBE_OK):
        return None
    xs = example_inputs(req.signature, 1, "cpu")
    spec = {
        "device": req.device.device,
        "inputs": [[list(x.shape), str(x.dtype).removeprefix("torch.")] for x in xs],
    }
    t0 = time.perf_counter()
    where = tempfile.mkdtemp(prefix="kubeforge-aoti-probe-")  # the child's extraction (see load_package)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(entry.path(PACKAGE)), json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "TMPDIR": where},
        )
    except subprocess.TimeoutExpired:
        return f"loading the AOTInductor package in a probe subprocess timed out after {timeout:.0f} s"
    finally:
        shutil.rmtree(where, ignore_errors=True)
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
        return f"loading the AOTInductor package crashed a probe subprocess ({how}) {tail[0]}".strip()
    entry.write_json(PROBE_OK, {"torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 2)})
    return None


def load_package(path: Path, device: str) -> Runner:
    """The package, loaded. torch's loader extracts it (the model's .so, with its weights) into a new
    directory under $TMPDIR and removes it only when the loaded model is destroyed, which a server's model
    never is before the process exits: every start left one behind in /tmp (1.7 MB for a tiny MLP, the
    size of the weights for a real model, in a pod's ephemeral storage). Here it goes into a directory of
    ours, removed when the process exits."""
    from torch._inductor import aoti_load_package

    index = torch.device(device).index
    tempfile.gettempdir()  # Python's own temporary directory is settled first and stays what it is
    where = tempfile.mkdtemp(prefix="kubeforge-aoti-")
    atexit.register(shutil.rmtree, where, ignore_errors=True)
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = where  # read by the C++ loader when it makes its directory
    try:
        model = aoti_load_package(str(path), device_index=-1 if index is None else index)
    finally:
        if before is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = before

    def run(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return as_tuple(model(*inputs))

    return run


def load_jit_artifacts(entry: CacheEntry | None) -> bool:
    """Feed torch.compile's portable cache (save_cache_artifacts) from an earlier start back in."""
    if entry is None or not entry.has(JIT_ARTIFACTS):
        return False
    try:
        torch.compiler.load_cache_artifacts(entry.path(JIT_ARTIFACTS).read_bytes())
    except Exception as e:  # a stale or foreign cache must never stop a start
        log.warning("ignoring unreadable torch.compile cache", extra={"error": repr(e)})
        return False
    return True


def save_jit_artifacts(entry: CacheEntry | None) -> None:
    if entry is None:
        return
    try:
        saved = torch.compiler.save_cache_artifacts()
    except Exception as e:
        log.warning("could not save the torch.compile cache", extra={"error": repr(e)})
        return
    if saved is not None:
        entry.write_bytes(JIT_ARTIFACTS, saved[0])


def jit_compile(
    req: CompileRequest, *, mode: str | None = None, backend: str = "inductor", static: bool = False
) -> Runner:
    """torch.compile the module (compiled lazily, at the driver's warm-up).

    `static`: one graph per batch size seen (the batcher pads to a few buckets, all warmed up), which is
    what CUDA graphs replay anyway. Otherwise automatic dynamic shapes: the first warm-up size compiles a
    static graph, the second a graph with a dynamic batch dimension that serves every other size. Static
    matters: ops without a symbolic-shape implementation (nn.TransformerEncoderLayer's fused fast path,
    aten._transformer_encoder_layer_fwd) break a dynamic graph, and everything between the breaks then runs
    eagerly, holding the GIL (BERT-base on an H200: 2.9 ms of CPU per call instead of 0.2-0.4 ms).
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    compiled = torch.compile(req.module, mode=mode, backend=backend, dynamic=False if static else None)
    return call_module(compiled)


_Graph = tuple[Any, list[torch.Tensor], tuple[torch.Tensor, ...]]  # CUDAGraph, static inputs, static outputs


def cuda_graphs(run: Runner) -> Runner:
    """One CUDA graph per input shape (the batcher's buckets), captured on first use around `run` (a
    torch.compile'd module without cudagraphs of its own); a call copies the inputs into the graph's static
    inputs and replays it: two or three torch calls instead of torch.compile's CUDA-graph-tree bookkeeping
    (~0.4 ms of Python with the GIL per call for BERT-base on an H200). The outputs are the graph's static
    outputs, which the next replay overwrites: a caller copies them out first (stream order keeps a queued
    copy safe). Each graph has its own memory pool: with one pool shared by all (as torch.compile's trees
    do, with their own liveness tracking), a replay of one bucket overwrote another bucket's outputs on the
    H200 even though they were still referenced."""
    graphs: dict[tuple[Any, ...], _Graph] = {}

    def capture(inputs: Sequence[torch.Tensor]) -> _Graph:
        static = [x.clone() for x in inputs]
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile, autotune and warm up outside the capture
                run(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = run(static)
        return graph, static, outs

    def call(inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        key = tuple((x.shape, x.dtype) for x in inputs)
        entry = graphs.get(key)
        if entry is None:
            entry = graphs[key] = capture(inputs)
        graph, static, outs = entry
        for s, x in zip(static, inputs, strict=True):
            s.copy_(x, non_blocking=True)
        graph.replay()
        return outs

    return call


def static_batch_ok(req: CompileRequest) -> bool:
    """Static graphs per batch bucket need every other dimension fixed (no sequence-length recompiles)."""
    return all(-1 not in s.shape[1:] for s in req.signature.inputs)


def inductor_compile(req: CompileRequest, backend: str, *, cudagraphs: bool) -> Compiled:
    """aot: AOTInductor package (cached, probed in a subprocess); jit: torch.compile; fallbacks recorded."""
    fallbacks: list[str] = []
    entry = req.cache
    if req.mode == "aot":
        bad = aoti_known_bad()
        if bad:
            fallbacks.append(f"aot -> jit: {bad}")
        elif entry is None:
            fallbacks.append("aot -> jit: no compile cache directory to write the AOTInductor package to")
        else:
            try:
                hit = entry.has(PACKAGE)
                if not hit:
                    aot_compile(req, entry)
                why = probe_package(entry, req)
                if why is None:
                    return Compiled(
                        load_package(entry.path(PACKAGE), req.device.device),
                        backend,
                        "aot",
                        "torch.export + AOTInductor package",
                        cache_hit=hit,
                        details={"package": str(entry.path(PACKAGE))},
                    )
                fallbacks.append(f"aot -> jit: {why}")
            except Exception as e:  # export and AOTInductor fail in many ways on user models
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                fallbacks.append(
                    f"aot -> jit: torch.export/AOTInductor failed: {type(e).__name__}: {first}"[:500]
                )
    if req.mode in ("aot", "jit"):
        hit = load_jit_artifacts(entry)
        buckets = batch_buckets(req.max_batch_size, req.batch_sizes) if cudagraphs else None
        static = buckets is not None and static_batch_ok(req)
        if static:  # fixed shapes per bucket: our own CUDA graph around each bucket's static graph
            run = cuda_graphs(jit_compile(req, static=True))
            path = "torch.compile(inductor, one static graph and one CUDA graph per batch bucket)"
        else:  # variable sequence lengths: torch.compile's CUDA graph trees follow the shapes
            run = jit_compile(req, mode="reduce-overhead" if cudagraphs else None)
            path = "torch.compile(inductor" + (", reduce-overhead: CUDA graphs)" if cudagraphs else ")")
        return Compiled(
            run,
            backend,
            "jit",
            path,
            cache_hit=hit,
            fallbacks=fallbacks,
            batch_buckets=buckets,
            after_warmup=lambda: save_jit_artifacts(entry),
        )
    return Compiled(call_module(req.module), backend, "eager", "eager", fallbacks=fallbacks)


def batch_buckets(max_batch: int, warmup: Sequence[int]) -> tuple[int, ...]:
    """The row counts batches are padded to (one static graph each): powers of two up to 16, four steps per
    doubling from there (16, 20, 24, 28, 32, 40, 48, 56, 64, 80, ...), max_batch and the warm-up sizes.

    From ~16 rows a batch's device time grows with its rows (BERT-base on an H200: 1.05 ms at 16, 1.46 at
    24, 1.75 at 32, 3.33 at 64), so padding costs that much: a batch of 25 rows ran as 32 with powers of two
    alone. Quarter steps waste at most a fifth of a batch there; with 64 closed-loop clients they raised
    BERT's rows/s from 12,780 to 15,567 in one run (docs/benchmarks.md). Below 16 rows a batch costs about its
    launch, and powers of two keep the graphs few (13 for max_batch 64 instead of 7: more start-up time)."""
    sizes = {max_batch, *(b for b in warmup if b <= max_batch)}
    b = 1
    while b < max_batch:
        sizes.add(b)
        step = b // 4 if b >= 16 else b
        sizes.update(range(b + step, min(2 * b, max_batch), step))
        b *= 2
    return tuple(sorted(sizes))
