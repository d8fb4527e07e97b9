"""CPU training benchmark: samples/s of `kubeforge-train --local` at 1, 2 and 4 processes (gloo, FSDP2),
with a fixed per-process batch (weak scaling), printed as a table.

    python bench/train_cpu.py                       # digits MLP, 32 samples per process, 60 steps
    python bench/train_cpu.py --model llama --procs 1,2,4 --steps 30

Throughput is timed between the step-10 and last-step records of the metrics file (both written after an
all-reduce, so every process has finished those steps). On a machine shared with other work the figures
move with the load: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import local_run_args


def spec_for(model: str, procs: int, per_proc: int, steps: int, tmp: Path) -> dict[str, Any]:
    if model == "llama":
        m = {"builtin": "llama", "preset": "tiny"}
        d = {"builtin": "synthetic-tokens", "sequenceLength": 64, "vocabSize": 256}
    else:
        m, d = {"builtin": model, "preset": "small"}, {"builtin": "digits"}
    return {
        "apiVersion": "kubeforge.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "cpu-bench"},
        "spec": {
            "model": m,
            "data": d,
            "processesPerNode": procs,
            "optimizer": {"steps": steps, "globalBatchSize": per_proc * procs},
            "checkpoint": {"intervalSteps": 1_000_000, "path": str(tmp / "ckpt")},
        },
    }


def run(model: str, procs: int, per_proc: int, steps: int) -> dict[str, Any]:
    from runtime.training import cli

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        job, metrics = tmp / "job.json", tmp / "metrics.jsonl"
        job.write_text(json.dumps(spec_for(model, procs, per_proc, steps, tmp)))
        code = cli.main(local_run_args(job, procs, metrics))
        if code:
            raise SystemExit(f"run with {procs} processes failed ({code})")
        recs = [json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x]
    first, last = recs[0], recs[-1]
    sps = (last["step"] - first["step"]) * per_proc * procs / (last["time"] - first["time"])
    return {"procs": procs, "samples_per_s": sps, "loss": last["loss"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn", "llama"])
    p.add_argument("--procs", default="1,2,4")
    p.add_argument("--per-proc-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = [run(args.model, int(n), args.per_proc_batch, args.steps) for n in args.procs.split(",")]
    base = rows[0]["samples_per_s"] / rows[0]["procs"]
    print(
        f"\nmodel {args.model}, {args.per_proc_batch} samples per process per step, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    print("| processes | samples/s | speed-up | scaling efficiency |\n|---|---|---|---|")
    for r in rows:
        speedup = r["samples_per_s"] / rows[0]["samples_per_s"]
        print(
            f"| {r['procs']} | {r['samples_per_s']:,.0f} | {speedup:.2f}x | "
            f"{100 * r['samples_per_s'] / (base * r['procs']):.0f} % |"
        )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    sys.exit(main())
