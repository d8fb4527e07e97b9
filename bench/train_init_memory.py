"""Host memory a rank needs to build a sharded model: the llama built on the meta device and filled shard by
shard once FSDP2 has sharded it (what the runtime does), against the same model built whole on the CPU
first and then sharded (what it did before, and what a plain FSDP script does), measured in the same run.

Each way runs `--world` processes (gloo, 127.0.0.1) through the runtime's own `build_job` (FSDP2 over all of
them), each in a fresh process so that its peak resident memory (ru_maxrss) is its own:

    python bench/train_init_memory.py                       # preset 1b (0.95 B parameters), 2 processes
    python bench/train_init_memory.py --preset small --world 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port  # noqa: E402


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(spec_path: str, way: str) -> dict[str, Any]:
    """One rank: build the job, report its memory. `way` cpu: the model filled on the CPU before it is
    sharded."""
    import torch

    from runtime.training import job as job_mod
    from runtime.training.parallel.materialize import materialize
    from runtime.training.spec import load_spec

    spec = load_spec(spec_path)
    base = _rss_mb()  # torch imported, nothing built
    if way == "cpu":
        build = job_mod.build_task

        def whole_on_cpu(s: Any) -> Any:
            task = build(s)
            materialize(task.model, torch.device("cpu"), task.init_weights)
            return task

        job_mod.build_task = whole_on_cpu  # type: ignore[assignment]
    start = time.perf_counter()
    job = job_mod.build_job(spec, keep_plain_copy=False)
    seconds = time.perf_counter() - start
    local = sum(p.to_local().nbytes if hasattr(p, "to_local") else p.nbytes for p in job.params())
    full = sum(p.numel() * p.element_size() for p in job.params())
    return {
        "rank": int(os.environ["RANK"]),
        "base_mb": base,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "after_mb": _rss_mb(),
        "shard_mb": local / 2**20,
        "model_mb": full / 2**20,
        "seconds": seconds,
    }


def draw_rate() -> float:
    """Normal random numbers one CPU thread draws a second, as the llama's init draws them (best of 3)."""
    import torch

    torch.set_num_threads(1)
    t = torch.empty(32 * 2**20)
    g = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        t.normal_(0.0, 0.02, generator=g)
        best = min(best, time.perf_counter() - start)
    return t.numel() / best


def run_way(spec_path: Path, way: str, world: int) -> list[dict[str, Any]]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, __file__, "--worker", str(spec_path), "--way", way]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=1800)
        if p.returncode:
            raise SystemExit(f"{way}: a rank failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1b")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--way", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.way)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        spec = {
            "model": {"builtin": "llama", "preset": a.preset},
            "data": {"builtin": "synthetic-tokens", "sequenceLength": 128, "vocabSize": a.vocab},
            "optimizer": {"steps": 1, "globalBatchSize": a.world},
            "parallelism": {"data": -1},
            "checkpoint": {"path": str(Path(tmp) / "ckpt")},
        }
        path = Path(tmp) / "job.json"
        path.write_text(json.dumps({"spec": spec}))
        rows = {way: run_way(path, way, a.world) for way in ("cpu", "meta")}
    print(f"`python bench/train_init_memory.py --preset {a.preset} --world {a.world} --vocab {a.vocab}`\n")
    model_mb = rows["meta"][0]["model_mb"]
    print(
        f"llama {a.preset}, vocabulary {a.vocab}: {model_mb:,.0f} MB of fp32 parameters; FSDP2 over {a.world}"
    )
    print(
        "processes (gloo); per rank, the largest over the ranks; MB above the process with torch imported\n"
    )
    print(
        "| model built | peak MB | MB after the build | its shards MB | build s | peak x built on the CPU |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    cpu_peak = max(r["peak_mb"] - r["base_mb"] for r in rows["cpu"])
    for way, label in (("cpu", "whole on the CPU, then sharded"), ("meta", "on meta, filled shard by shard")):
        rs = rows[way]
        peak = max(r["peak_mb"] - r["base_mb"] for r in rs)
        after = max(r["after_mb"] - r["base_mb"] for r in rs)
        shard = max(r["shard_mb"] for r in rs)
        secs = max(r["seconds"] for r in rs)
        print(f"| {label} | {peak:,.0f} | {after:,.0f} | {shard:,.0f} | {secs:.1f} | {peak / cpu_peak:.2f} |")
    rate = draw_rate()
    print(
        f"\nOne CPU thread draws {rate / 1e6:,.0f} M normal numbers a second here: each rank of the meta "
        f"build draws the whole model, {model_mb * 2**20 / 4 / rate:.1f} s of it for this one."
    )


if __name__ == "__main__":
    main()
