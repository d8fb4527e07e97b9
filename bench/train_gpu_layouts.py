"""Training layouts benchmark: the Llama-style decoder trained by the runtime (`kubeforge-train --local`,
per-block torch.compile, bf16) under data x tensor x pipeline layouts, against the runtime on one GPU and
against a bf16 matrix-product ceiling measured in the same run.

    # 4 GPUs (nvidia-h200-x4): ceiling, 1 GPU, FSDP2 x 4, d2 x t2, d2 x p2, t2 x p2
    python3 bench/train_gpu_layouts.py --layouts 1,d4,d2t2,d2p2,t2p2 --out $OUT
    # 8 GPUs (issue 7): python3 bench/train_gpu_layouts.py --layouts 1,d8,d2t2p2 --out $OUT
    # CPU smoke test (gloo, forked workers, no MFU):
    python bench/train_gpu_layouts.py --preset tiny --seq 128 --steps 6 --warmup 2 --log-every 2 \
        --layouts 1,d4,d2t2,d2p2,t2p2

A layout is `1` (one GPU) or degrees such as `d2t2p2` (data 2 x tensor 2 x pipeline 2; a missing letter is 1),
then suffixes: `:sp` sequence parallelism, `:zb` / `:zbv` / `:dpv` / `:i1f1b` two stages a GPU under
InterleavedZeroBubble / ZBVZeroBubble / DualPipeV / Interleaved1F1B, `:eager` no torch.compile.
Every layout keeps the same work per GPU: `--batch` sequences of `--seq` tokens per GPU per step, so the
global batch is batch x GPUs; a data rank's share is split over its tensor x pipeline GPUs. Data parallelism
is FSDP2 (`dataMode: fsdp`); pipelines run 1F1B with `--micro-batches` micro-batches per step.

Throughput is timed between two metrics records of the runtime (each written after an all-reduce of the
loss, so every rank has finished that step): the first logged step at or after `--warmup` and the last step.
MFU counts 6N + 12LHQT FLOPs per token (torchtitan's count) against (a) the 989.5 TFLOP/s dense bf16
datasheet peak and (b) the bf16 matrix product measured here (8192^3 by default, on each GPU, mean).
Peak memory per GPU is torch.cuda.max_memory_allocated / max_memory_reserved of each worker, read when it
exits (through a sitecustomize the benchmark puts on the workers' PYTHONPATH), and nvidia-smi's
memory.used polled every 2 s (allocator reserve + CUDA context + NCCL buffers).

NVLink multicast stays off in every launched process: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1. Results are written to --out after each layout, so a run cut short keeps what it
finished.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import local_run_args  # noqa: E402
from crds.trainingjob import SPLIT_BACKWARD_SCHEDULES  # noqa: E402

DATASHEET_BF16 = 989.5e12  # H100/H200 SXM dense bf16
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
os.environ.update(NO_MULTICAST)  # this process and everything it starts

# Put on the workers' PYTHONPATH: each worker (RANK set by the elastic agent) writes its CUDA memory peaks at
# exit. Nothing happens in processes without RANK or without an initialised CUDA context.
SITECUSTOMIZE = """
import atexit, json, os, sys

def _kf_bench_mem():
    d, rank = os.environ.get("KF_BENCH_MEM_DIR"), os.environ.get("RANK")
    torch = sys.modules.get("torch")
    if not d or rank is None or torch is None:
        return
    try:
        if not torch.cuda.is_initialized():
            return
        dev = torch.cuda.current_device()
        rec = {"rank": int(rank), "pid": os.getpid(), "device": dev,
               "max_allocated": torch.cuda.max_memory_allocated(dev),
               "max_reserved": torch.cuda.max_memory_reserved(dev)}
        with open(os.path.join(d, f"mem-{rank}-{os.getpid()}.json"), "w") as f:
            json.dump(rec, f)
    except Exception:
        pass

atexit.register(_kf_bench_mem)
"""


FLAGS = {  # a layout's suffixes, and what its name says of each
    "eager": " (eager, no compile)",
    "sp": " (sequence parallel)",
    "i1f1b": " (Interleaved1F1B, 2 stages a GPU)",
    "zb": " (InterleavedZeroBubble, 2 stages a GPU, no compile: the runtime refuses both)",
    "zbv": " (ZBVZeroBubble, 2 stages a GPU in a V, no compile: the runtime refuses both)",
    "dpv": " (DualPipeV, 2 stages a GPU in a V, no compile: the runtime refuses both)",
}


# the suffixes that pick a pipeline schedule with two stages a GPU
SCHEDULE_FLAGS = {
    "i1f1b": "Interleaved1F1B",
    "zb": "InterleavedZeroBubble",
    "zbv": "ZBVZeroBubble",
    "dpv": "DualPipeV",
}


def parse_layout(text: str) -> dict[str, int]:
    """`1` -> one GPU; `d2t2p2` -> data 2, tensor 2, pipeline 2 (missing letters are 1); suffixes (FLAGS):
    `:eager` runs that layout without torch.compile, `:sp` with sequence parallelism, `:i1f1b` / `:zb` /
    `:zbv` / `:dpv` its pipeline with two stages a GPU, Interleaved1F1B / InterleavedZeroBubble /
    ZBVZeroBubble / DualPipeV."""
    text, *flags = text.strip().split(":")
    bad = sorted(set(flags) - set(FLAGS))
    if bad:
        raise ValueError(f"layout suffixes {bad}: expected some of {sorted(FLAGS)}")
    if text == "1":
        out = {"d": 1, "t": 1, "p": 1}
    else:
        parts = re.findall(r"([dtp])(\d+)", text)
        if not parts or "".join(f"{k}{v}" for k, v in parts) != text:
            raise ValueError(f"layout {text!r}: expected 1 or letters d/t/p with degrees, e.g. d2t2p2")
        out = {"d": 1, "t": 1, "p": 1}
        for k, v in parts:
            out[k] = int(v)
    return {**out, **dict.fromkeys(flags, 1)}


def layout_name(lay: dict[str, int]) -> str:
    flags = "".join(said for flag, said in FLAGS.items() if lay.get(flag))
    if lay["d"] * lay["t"] * lay["p"] == 1:
        return "1 GPU" + flags
    words = (("d", "data "), ("t", "tensor "), ("p", "pipeline "))
    return " x ".join(f"{w}{lay[k]}" for k, w in words if lay[k] > 1) + flags


# ---------------------------------------------------------------------------------------------- ceiling


def matmul_ceiling(n: int, reps: int) -> dict[str, Any]:
    """bf16 n x n x n torch.matmul on random normal data, on each visible GPU: TFLOP/s over ``reps`` products
    after 5 warm-ups (CUDA events)."""
    import torch

    if not torch.cuda.is_available():
        return {"available": False}
    per_gpu = []
    for i in range(torch.cuda.device_count()):
        dev = torch.device("cuda", i)
        torch.manual_seed(i)
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)
        for _ in range(5):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize(dev)
        with torch.cuda.device(dev):
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            stop = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            for _ in range(reps):
                torch.matmul(a, b, out=c)
            stop.record()
            stop.synchronize()
        ms = start.elapsed_time(stop)
        per_gpu.append(2.0 * n**3 * reps / (ms / 1e3))
        del a, b, c
        torch.cuda.empty_cache()
    return {
        "available": True,
        "n": n,
        "reps": reps,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "gpu_count": torch.cuda.device_count(),
        "per_gpu_flops": per_gpu,
        "mean_flops": sum(per_gpu) / len(per_gpu),
    }


# ---------------------------------------------------------------------------------------------- memory


class SmiPoller:
    """Max nvidia-smi memory.used (MiB) per GPU while a run is going; nothing where nvidia-smi is missing."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval, self.peak = interval, {}  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.exe = shutil.which("nvidia-smi")

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    [self.exe, "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],  # type: ignore[list-item]
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                for line in out.strip().splitlines():
                    i, used = (int(x) for x in line.split(","))
                    self.peak[i] = max(self.peak.get(i, 0), used)
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> SmiPoller:
        if self.exe:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=15)


# ---------------------------------------------------------------------------------------------- one layout


def spec_for(args: argparse.Namespace, lay: dict[str, int], tmp: Path) -> dict[str, Any]:
    gpus = lay["d"] * lay["t"] * lay["p"]
    mb = args.micro_batches if lay["p"] > 1 else 1
    par: dict[str, Any] = {
        "data": lay["d"],
        "tensor": lay["t"],
        "pipeline": lay["p"],
        "dataMode": "fsdp",
        "microBatches": mb,
        "sequenceParallel": bool(lay.get("sp")),
    }
    if lay["p"] > 1:
        par["pipelineSchedule"] = "1F1B"
        for flag, schedule in SCHEDULE_FLAGS.items():
            if lay.get(flag):
                par["pipelineSchedule"], par["stagesPerRank"] = schedule, 2
    return {
        "apiVersion": "kubeforge.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "bench-layouts"},
        "spec": {
            "model": {"builtin": "llama", "preset": args.preset},
            "data": {"builtin": "synthetic-tokens", "sequenceLength": args.seq, "vocabSize": args.vocab},
            "optimizer": {
                "steps": args.steps,
                "globalBatchSize": args.batch * gpus,
                "learningRate": 3e-4,
            },
            "processesPerNode": gpus,
            "parallelism": par,
            "precision": "bf16",
            # the runtime refuses compile with the schedules that split the backward (zero bubble)
            "compile": args.compile
            and not lay.get("eager")
            and par.get("pipelineSchedule") not in SPLIT_BACKWARD_SCHEDULES,
            "checkpoint": {"intervalSteps": 1_000_000, "path": str(tmp / "ckpt")},
        },
    }


def flops_per_token(preset: str, vocab: int, seq: int) -> float:
    from dataclasses import replace

    from runtime.training.models.llama import PRESETS
    from runtime.training.models.llama import flops_per_token as fpt

    return fpt(replace(PRESETS[preset], vocab=vocab), seq)


def run_layout(
    args: argparse.Namespace, text: str, tmp: Path, timeout: float | None, log: Any
) -> dict[str, Any]:
    lay = parse_layout(text)
    gpus = lay["d"] * lay["t"] * lay["p"]
    run_dir = tmp / text
    run_dir.mkdir(parents=True, exist_ok=True)
    mem_dir, site = run_dir / "mem", run_dir / "site"
    mem_dir.mkdir(exist_ok=True)
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    job, metrics = run_dir / "job.json", run_dir / "metrics.jsonl"
    spec = spec_for(args, lay, run_dir)
    job.write_text(json.dumps(spec))
    env = {
        **os.environ,
        **NO_MULTICAST,
        "KF_BENCH_MEM_DIR": str(mem_dir),
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    if args.cuda:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    cmd = [sys.executable, "-m", "runtime.training.cli", *local_run_args(job, gpus, metrics, args.log_every)]
    row: dict[str, Any] = {
        "layout": text,
        "name": layout_name(lay),
        "gpus": gpus,
        "data": lay["d"],
        "tensor": lay["t"],
        "pipeline": lay["p"],
        "micro_batches": spec["spec"]["parallelism"]["microBatches"],
        "global_batch": args.batch * gpus,
        "tokens_per_step": args.batch * gpus * args.seq,
        "compile": spec["spec"]["compile"],
    }
    t0 = time.perf_counter()
    with SmiPoller() as smi:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: a timeout ends the agent and its workers
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            row["error"] = f"timed out after {timeout:.0f} s"
    row["wall_s"] = time.perf_counter() - t0
    log.write(f"===== {text} ({layout_name(lay)}) exit {proc.returncode}, {row['wall_s']:.1f} s\n")
    log.write(output[-6000:] if (proc.returncode or "error" in row) else output[-1500:])
    log.write("\n")
    log.flush()
    if proc.returncode and "error" not in row:
        row["error"] = f"exit code {proc.returncode}: " + _last_error(output)
    recs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    start = next((r for r in recs if r.get("event") == "start"), None)
    logged = [r for r in recs if "loss" in r]
    if start:
        row["layout_described"] = start.get("layout")
    if logged:
        row["first_step_s"] = logged[0]["time"] - (start["time"] if start else logged[0]["time"])
        row["loss"] = logged[-1]["loss"]
        row["steps_done"] = logged[-1]["step"]
    timed = [r for r in logged if r["step"] >= args.warmup]
    if len(timed) >= 2 and timed[-1]["time"] > timed[0]["time"]:
        a, b = timed[0], timed[-1]
        steps = b["step"] - a["step"]
        tps = steps * row["tokens_per_step"] / (b["time"] - a["time"])
        row.update(
            timed_steps=f"{a['step']}-{b['step']}",
            step_ms=1e3 * (b["time"] - a["time"]) / steps,
            tokens_per_s=tps,
            tokens_per_s_per_gpu=tps / gpus,
        )
    mem: dict[int, dict[str, Any]] = {}
    for f in mem_dir.glob("mem-*.json"):
        r = json.loads(f.read_text())
        prev = mem.get(r["rank"])
        if prev is None or r["max_allocated"] > prev["max_allocated"]:
            mem[r["rank"]] = r
    if mem:
        row["peak_alloc_gib"] = [round(mem[k]["max_allocated"] / 2**30, 2) for k in sorted(mem)]
        row["peak_reserved_gib"] = [round(mem[k]["max_reserved"] / 2**30, 2) for k in sorted(mem)]
    if smi.peak:
        row["smi_used_gib"] = [round(smi.peak[i] / 1024, 2) for i in sorted(smi.peak) if i < gpus]
    return row


def _last_error(output: str) -> str:
    """The last exception line (``SomeError: ...``) of the output, else the last line naming an error."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    exc = [ln for ln in lines if re.search(r"(^|\] )\w*(Error|Exception)\b.*:", ln)]
    hits = exc or [ln for ln in lines if "kubeforge-train:" in ln or "Error" in ln]
    last = hits[-1] if hits else (lines[-1] if lines else "no output")
    return last.split("] ", 1)[-1][-500:]


# ---------------------------------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]], ceiling: float | None) -> str:
    out = [
        "| layout | GPUs | global batch (seqs) | tokens/s | tokens/s per GPU | MFU (989.5) | MFU (measured) "
        "| vs 1 GPU | scaling eff. | peak alloc / reserved per GPU (GiB) | first step (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "tokens_per_s" not in r:
            err = r.get("error", "?")
            out.append(f"| {r['name']} | {r['gpus']} | {r['global_batch']} | failed: {err} |||||||")
            continue

        def pct(v: float | None) -> str:
            return f"{100 * v:.1f} %" if v else "n/a"

        mem = "n/a"
        if r.get("peak_alloc_gib"):
            mem = f"{max(r['peak_alloc_gib']):.1f} / {max(r['peak_reserved_gib']):.1f}"
        vs = r.get("vs_1gpu")
        out.append(
            f"| {r['name']} | {r['gpus']} | {r['global_batch']} | {r['tokens_per_s']:,.0f} "
            f"| {r['tokens_per_s_per_gpu']:,.0f} | {pct(r.get('mfu_datasheet'))} "
            f"| {pct(r.get('mfu_measured'))} "
            f"| {f'{vs:.2f}x' if vs else 'n/a'} | {pct(r.get('scaling_efficiency'))} | {mem} "
            f"| {r.get('first_step_s', 0):.0f} |"
        )
    if ceiling:
        out.append(
            f"\nmeasured bf16 matmul ceiling: {ceiling / 1e12:.1f} TFLOP/s per GPU "
            f"(datasheet dense peak {DATASHEET_BF16 / 1e12:.1f})"
        )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="1,d4,d2t2,d2p2,t2p2")
    p.add_argument("--preset", default="1b")
    p.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="timing starts at the first logged step >= this")
    p.add_argument("--log-every", type=int, default=5, help="runtime --log-every (each log syncs the ranks)")
    p.add_argument("--micro-batches", type=int, default=8, help="1F1B micro-batches per step (pipeline > 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--retry-eager",
        action="store_true",
        help="rerun a compiled layout that fails (not one that times out) without torch.compile",
    )
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--matmul-reps", type=int, default=50)
    p.add_argument("--deadline-s", type=float, default=0, help="stop starting layouts after this (0: none)")
    p.add_argument(
        "--min-layout-s", type=float, default=60, help="skip a layout with less time than this left"
    )
    p.add_argument("--out", default=None)
    p.add_argument("--matmul-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.matmul_only:
        print(json.dumps(matmul_ceiling(args.matmul_n, args.matmul_reps)))
        return 0
    t_start = time.perf_counter()
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    for x in layouts:
        parse_layout(x)
    args.cuda = Path("/dev/nvidiactl").exists()
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    log_path = (out / "layouts.log") if out else Path(tempfile.gettempdir()) / "train_gpu_layouts.log"
    result: dict[str, Any] = {
        "preset": args.preset,
        "seq": args.seq,
        "batch_per_gpu": args.batch,
        "vocab": args.vocab,
        "steps": args.steps,
        "warmup": args.warmup,
        "log_every": args.log_every,
        "micro_batches": args.micro_batches,
        "compile": args.compile,
        "env": NO_MULTICAST,
        "flops_per_token": flops_per_token(args.preset, args.vocab, args.seq),
        "datasheet_flops": DATASHEET_BF16,
        "rows": [],
    }

    def save() -> None:
        if out:
            (out / "train_layouts.json").write_text(json.dumps(result, indent=1))

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f} s] {msg}", flush=True)

    ceiling = None
    if args.cuda:
        progress(f"matmul ceiling: bf16 {args.matmul_n}^3 x {args.matmul_reps} on each GPU")
        mm = subprocess.run(
            [
                sys.executable,
                __file__,
                "--matmul-only",
                "--matmul-n",
                str(args.matmul_n),
                "--matmul-reps",
                str(args.matmul_reps),
            ],
            capture_output=True,
            text=True,
        )
        if mm.returncode == 0:
            result["matmul"] = json.loads(mm.stdout.strip().splitlines()[-1])
            ceiling = result["matmul"].get("mean_flops")
            progress(
                "matmul: "
                + ", ".join(f"{f / 1e12:.1f}" for f in result["matmul"]["per_gpu_flops"])
                + " TFLOP/s"
            )
        else:
            result["matmul"] = {"error": mm.stderr[-2000:]}
            progress("matmul failed:\n" + mm.stderr[-2000:])
        save()
    fpt = result["flops_per_token"]
    base: float | None = None
    with tempfile.TemporaryDirectory() as d, log_path.open("a") as log:
        queue = list(layouts)
        while queue:
            text = queue.pop(0)
            left = args.deadline_s - (time.perf_counter() - t_start) if args.deadline_s else 1e9
            lay = parse_layout(text)
            gpus = lay["d"] * lay["t"] * lay["p"]
            row_stub = {
                "layout": text,
                "name": layout_name(lay),
                "gpus": gpus,
                "global_batch": args.batch * gpus,
            }
            if left < args.min_layout_s:
                progress(f"{text}: skipped, {left:.0f} s left")
                result["rows"].append({**row_stub, "error": f"not run: {left:.0f} s left of the deadline"})
                save()
                continue
            have = result.get("matmul", {}).get("gpu_count")
            if args.cuda and have and gpus > have:
                progress(f"{text}: skipped, needs {gpus} GPUs, {have} here")
                result["rows"].append({**row_stub, "error": f"not run: needs {gpus} GPUs, {have} here"})
                save()
                continue
            progress(f"{text} ({layout_name(lay)}) on {gpus} {'GPU' if args.cuda else 'process'}(es)")
            limit = max(30.0, left - 10) if args.deadline_s else None
            row = run_layout(args, text, Path(d), limit, log)
            if "tokens_per_s" in row:
                if gpus == 1 and base is None:
                    base = row["tokens_per_s"]
                if base:
                    row["vs_1gpu"] = row["tokens_per_s"] / base
                    row["scaling_efficiency"] = row["vs_1gpu"] / gpus
                if args.cuda:
                    row["mfu_datasheet"] = row["tokens_per_s"] * fpt / (DATASHEET_BF16 * gpus)
                    if ceiling:
                        row["mfu_measured"] = row["tokens_per_s"] * fpt / (ceiling * gpus)
            result["rows"].append(row)
            save()
            progress(f"{text}: " + json.dumps({k: v for k, v in row.items() if k != "layout_described"}))
            failed = "tokens_per_s" not in row and not str(row.get("error", "")).startswith("timed out")
            if failed and args.retry_eager and row.get("compile"):
                queue.insert(0, f"{text}:eager")
    md = table(result["rows"], ceiling)
    print("\n" + md)
    if out:
        (out / "train_layouts.md").write_text(md + "\n")
    return 0 if all("tokens_per_s" in r for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
