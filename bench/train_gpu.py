"""GPU training benchmark: the Llama-style decoder (preset 1b: 954M parameters) trained by the runtime
(`kubeforge-train --local`, FSDP2 over the GPUs, per-block torch.compile, bf16) against a plain single-GPU
PyTorch loop (the same model class, whole-model torch.compile, bf16 autocast, AdamW, grad clipping) measured
in the same run. Tokens/s are timed between synchronised steps after warm-up; MFU uses the dense bf16 peak.

    python3 bench/train_gpu.py --gpus 1,2 --out /tmp/bench     # on a machine with 2 GPUs
    python3 bench/train_gpu.py --preset tiny --seq 128 --steps 6 --warmup 2 --gpus 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import local_run_args  # noqa: E402


def plain_loop(
    preset: str, batch: int, seq: int, vocab: int, steps: int, warmup: int, compile_: bool
) -> dict[str, Any]:
    """What a user writes by hand for one GPU."""
    import torch

    from runtime.training.data import SyntheticTokens
    from runtime.training.metrics import peak_flops
    from runtime.training.models.llama import PRESETS, Transformer, flops_per_token, lm_loss

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a = PRESETS[preset]
    a = type(a)(**{**a.__dict__, "vocab": vocab, "max_seq_len": max(seq, a.max_seq_len)})
    torch.manual_seed(0)
    model = Transformer(a).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
    step_fn = torch.compile(model) if compile_ else model
    data = SyntheticTokens(vocab, seq, 0)
    times: list[float] = []
    for step in range(steps):
        xs, ys = zip(*(data[step * batch + i] for i in range(batch)), strict=True)
        x, y = torch.stack(xs), torch.stack(ys)
        if dev.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = lm_loss(step_fn(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1 >= warmup and (step + 1 - warmup) % 10 == 0) or step + 1 == steps:
            loss.item()  # synchronise
            times.append(time.perf_counter())
    elapsed = times[-1] - times[0]
    tps = _measured_steps(steps, warmup) * batch * seq / elapsed if elapsed > 0 else 0.0
    peak = peak_flops(dev, "bf16")
    mfu = tps * flops_per_token(a, seq) / peak if peak else None
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {
        "what": "plain loop, 1 GPU",
        "gpus": 1,
        "tokens_per_s": tps,
        "mfu": mfu,
        "peak_mem_gib": mem,
        "loss": float(loss),
    }


def _measured_steps(steps: int, warmup: int) -> int:
    """Steps between the first and the last synchronised timestamp of plain_loop."""
    marks = [s for s in range(1, steps + 1) if (s >= warmup and (s - warmup) % 10 == 0) or s == steps]
    return marks[-1] - marks[0]


def runtime_run(
    preset: str, batch: int, seq: int, vocab: int, steps: int, gpus: int, tmp: Path, compile_: bool
) -> dict[str, Any]:
    """kubeforge-train --local with FSDP2 over ``gpus`` GPUs; batch is per GPU (weak scaling)."""
    import torch

    from runtime.training.metrics import peak_flops

    spec = {
        "apiVersion": "kubeforge.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "bench"},
        "spec": {
            "model": {"builtin": "llama", "preset": preset},
            "data": {"builtin": "synthetic-tokens", "sequenceLength": seq, "vocabSize": vocab},
            "optimizer": {"steps": steps, "globalBatchSize": batch * gpus, "learningRate": 3e-4},
            "processesPerNode": gpus,
            "parallelism": {"data": -1, "dataMode": "fsdp"},
            "precision": "bf16",
            "compile": compile_,
            "checkpoint": {"intervalSteps": 1_000_000, "path": str(tmp / "ckpt")},
        },
    }
    job = tmp / f"bench-{gpus}.json"
    job.write_text(json.dumps(spec))
    metrics = tmp / f"metrics-{gpus}.jsonl"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    # a record every 10 steps, or every step in a short run (12 steps left two records: nothing to time)
    every = 10 if steps >= 30 else 1
    cmd = [sys.executable, "-m", "runtime.training.cli", *local_run_args(job, gpus, metrics, every)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"runtime run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    logged = [r for r in recs if "loss" in r]
    if len(logged) < 3:
        raise RuntimeError(f"{len(logged)} metrics records in {steps} steps: run more steps (--steps)")
    first, last = logged[1], logged[-1]  # skip the first logged step: it includes compilation
    tps = (last["step"] - first["step"]) * batch * gpus * seq / (last["time"] - first["time"])
    from runtime.training.models.llama import PRESETS, flops_per_token

    a = PRESETS[preset]
    a = type(a)(**{**a.__dict__, "vocab": vocab})
    peak = peak_flops(torch.device("cuda"), "bf16") if torch.cuda.is_available() else None
    mfu = tps * flops_per_token(a, seq) / (peak * gpus) if peak else None
    return {
        "what": f"kubeforge-train, {gpus} GPU" + (" (FSDP2)" if gpus > 1 else " (dp 1: no sharding)"),
        "gpus": gpus,
        "tokens_per_s": tps,
        "mfu": mfu,
        "loss": last["loss"],
        "wall_s": wall,
        "reported_mfu": last.get("mfu"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--gpus", default="1,2")
    p.add_argument("--out", default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_only:
        print(
            json.dumps(
                plain_loop(
                    args.preset, args.batch, args.seq, args.vocab, args.steps, args.warmup, args.compile
                )
            )
        )
        return 0
    out = Path(args.out) if args.out else None
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out:
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_gpu.json").write_text(json.dumps(rows, indent=1))

    plain = subprocess.run(
        [
            sys.executable,
            __file__,
            "--plain-only",
            "--preset",
            args.preset,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--vocab",
            str(args.vocab),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ],
        capture_output=True,
        text=True,
    )
    if plain.returncode != 0:
        print(plain.stderr[-4000:], file=sys.stderr)
        return 1
    base = json.loads(plain.stdout.strip().splitlines()[-1])
    record(base)
    with tempfile.TemporaryDirectory() as d:
        for g in (int(x) for x in args.gpus.split(",")):
            try:
                row = runtime_run(
                    args.preset, args.batch, args.seq, args.vocab, args.steps, g, Path(d), args.compile
                )
            except RuntimeError as e:
                print(e, file=sys.stderr)
                continue
            row["vs_plain"] = row["tokens_per_s"] / base["tokens_per_s"]
            record(row)
    print("\n| run | GPUs | tokens/s | MFU | vs plain 1-GPU loop |\n|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "n/a"
        print(
            f"| {r['what']} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {mfu} | {r.get('vs_plain', 1.0):.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
