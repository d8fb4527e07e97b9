"""AOT compile in an init-container step, then a serving start that loads from the cache without compiling;
the compiled model's answers equal eager's, and the package torch extracts to load it is gone once the server
stops. One AOTInductor compile of a tiny MLP (tens of seconds here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from tests.integration.serving.conftest import ROOT, Registry, start_serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_compile_step_fills_the_cache_and_serve_starts_from_it(registry: Registry, tmp_path: Path) -> None:
    cache, term = tmp_path / "cache", tmp_path / "termination-log"
    args = [
        "--model-uri",
        "models:/mlp/1",
        "--cache-dir",
        str(cache),
        "--mode",
        "aot",
        "--backend",
        "cpu",
        "--max-batch-size",
        "8",
        "--warmup-batch-sizes",
        "1,3",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.serving.cli", "compile", *args, "--termination-log", str(term)],
        cwd=ROOT,
        env=registry.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads(proc.stdout.strip().splitlines()[-1])
    assert first["backend"] == "cpu" and first["cache_hit"] is False
    assert json.loads(term.read_text()) == first  # the pod's termination message: the operator reads it
    if first["mode"] != "aot":  # a fallback must say why (e.g. a torch whose AOTInductor loading crashes)
        assert first["fallbacks"] and first["fallbacks"][0].startswith("aot -> jit")
        pytest.skip(f"AOTInductor unusable here: {first['fallbacks']}")
    assert first["compile_path"] == "torch.export + AOTInductor package" and first["fallbacks"] == []
    assert first["verified_max_rel_error"] < 1e-3
    assert list(cache.glob("mlp/*/model.pt2")) and list(cache.glob("mlp/*/probe-ok.json"))

    tmp = tmp_path / "tmp"  # the server's $TMPDIR: torch extracts the package under it
    tmp.mkdir()
    s = start_serve({**registry.env, "TMPDIR": str(tmp)}, *args, "--max-delay-ms", "0")
    try:
        ready = s.wait_ready()
        assert (
            ready["mode"] == "aot" and ready["cache_hit"] is True and ready["cache_key"] == first["cache_key"]
        )
        assert ready["compile_seconds"] < first["compile_seconds"]  # loaded, not compiled
        x = np.random.default_rng(5).standard_normal((5, 16), dtype=np.float32)  # a size never warmed up
        body = {
            "inputs": [{"name": "input__0", "shape": [5, 16], "datatype": "FP32", "data": x.ravel().tolist()}]
        }
        r = httpx.post(f"{s.url}/v2/models/mlp/infer", json=body)
        assert r.status_code == 200, r.text
        with torch.inference_mode():
            want = registry.mlp(torch.from_numpy(x)).numpy()
        got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(5, 4)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        info = httpx.get(f"{s.url}/v2/models/mlp/ready").json()
        assert info["compile_path"] == "torch.export + AOTInductor package" and info["cache_hit"] is True
        # loaded from our own directory under $TMPDIR (torch's extraction), not from torch's own
        assert [p.name.startswith("kubeforge-aoti-") for p in tmp.iterdir()] == [True], list(tmp.iterdir())
    finally:
        assert s.stop() == 0
    assert not list(tmp.iterdir()), "the extracted package outlived the server"
