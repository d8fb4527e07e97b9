"""Backend selection, the compile cache key and the compiled-vs-eager check (no real compiles here)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from runtime.serving import compile as compiler
from runtime.serving.compile.base import Backend, Compiled, CompileRequest, call_module
from runtime.serving.compile.cache import CacheEntry, cache_key
from runtime.serving.detect import Device, Hardware, detect_hardware
from runtime.serving.examples import MLP
from runtime.serving.signature import Signature, TensorSpec

SIG = Signature((TensorSpec("x", "FP32", (-1, 16)),), (TensorSpec("y", "FP32", (-1, 4)),))


@pytest.mark.parametrize(
    ("backend", "names"),
    [
        ("npu", "torch_npu"),
        ("mlu", "torch_mlu"),
        ("cuda", "torch.cuda.is_available() is False"),
        ("tensorrt", "NVIDIA GPU"),
        ("rocm", "torch.cuda.is_available() is False"),
    ],
)
def test_unavailable_backend_fails_naming_what_is_missing(backend: str, names: str) -> None:
    hw = detect_hardware()
    if compiler.BACKENDS[backend].missing(hw) is None:
        pytest.skip(f"{backend} is available on this machine")
    if backend == "tensorrt" and hw.usable("cuda"):
        names = "torch_tensorrt"  # a GPU without the package (the lent GPU machine's image)
    with pytest.raises(compiler.BackendUnavailable) as e:
        compiler.select_backend(backend, hw)
    assert backend in str(e.value) and names in str(e.value)


def test_unknown_backend_lists_the_choices() -> None:
    with pytest.raises(compiler.BackendUnavailable, match="unknown backend 'tpu'; choose one of auto"):
        compiler.select_backend("tpu", detect_hardware())


def test_auto_picks_cpu_here_and_says_why() -> None:
    hw = detect_hardware()
    if hw.family != "cpu":
        pytest.skip("an accelerator is present")
    backend, reason = compiler.select_backend("auto", hw)
    assert backend.name == "cpu"
    assert (
        reason.startswith("auto chose cpu: no accelerator usable") and "npu:" in reason and "cuda:" in reason
    )


def test_auto_prefers_the_accelerator_found() -> None:
    cpu = Device("cpu", "x", "cpu|x")
    gpu = Device("cuda:0", "NVIDIA H200", "cuda|NVIDIA H200|sm90|cuda13.0")
    hw = Hardware("cuda", {"cpu": cpu, "cuda": gpu}, {"npu": "no torch_npu"}, {"tensorrt": False})
    backend, reason = compiler.select_backend("auto", hw)
    assert backend.name == "cuda" and "NVIDIA H200" in reason
    npu = Device("npu:0", "Ascend910B", "npu|Ascend910B")
    hw = Hardware("npu", {"cpu": cpu, "npu": npu}, {"cuda": "none"}, {})
    assert compiler.select_backend("auto", hw)[0].name == "npu"
    assert compiler.select_backend("cpu", hw)[0].name == "cpu"


def test_cache_key_changes_with_each_part(tmp_path: Path) -> None:
    base = {
        "model": "m1|v1",
        "backend": "cpu",
        "mode": "aot",
        "hardware": "cpu|x",
        "torch": "2.15",
        "inputs": [[-1, 16]],
        "max_batch_size": 32,
    }
    keys = {cache_key(base)}
    for k, v in [
        ("model", "m1|v2"),
        ("backend", "cuda"),
        ("hardware", "cpu|y"),
        ("torch", "2.16"),
        ("inputs", [[-1, 32]]),
        ("max_batch_size", 64),
    ]:
        keys.add(cache_key(base | {k: v}))
    assert len(keys) == 7
    a = CacheEntry.open(tmp_path, "my model", base)
    b = CacheEntry.open(tmp_path, "my model", dict(base))
    assert a.root == b.root and (a.root / "key.json").is_file()
    a.write_bytes("blob", b"123")
    assert b.has("blob") and not any(p.name.startswith(".") for p in a.root.iterdir())


class _Wrong(Backend):
    """A backend whose 'compiled' model is off by one: the check must catch it."""

    name = "cpu"
    family = "cpu"

    def compile(self, req: CompileRequest) -> Compiled:
        def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            with torch.inference_mode():
                return (req.module(*xs) + 1,)

        return Compiled(run, self.name, "jit", "wrong on purpose")  # type: ignore[arg-type]


def test_compiled_output_checked_against_eager_falls_back_visibly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(compiler.BACKENDS, "cpu", _Wrong())
    caplog.set_level(logging.WARNING)
    b = compiler.build(MLP(), SIG, hw=detect_hardware(), requested="cpu", mode="jit")
    assert b.compiled.mode == "eager"
    assert any("failed the check against eager" in f for f in b.compiled.fallbacks)
    assert any("compile fallback" in r.getMessage() for r in caplog.records)
    with pytest.raises(AssertionError, match="relative error"):
        compiler.build(MLP(), SIG, hw=detect_hardware(), requested="cpu", mode="jit", strict=True)


class _Raising(Backend):
    """A backend whose 'compiled' model fails with a bare assert (as torch's compilers' internals do)."""

    name = "cpu"
    family = "cpu"

    def compile(self, req: CompileRequest) -> Compiled:
        def run(xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            raise AssertionError()  # a bare `assert` (pytest would add a message to one written here)

        return Compiled(run, self.name, "jit", "raises on purpose")  # type: ignore[arg-type]


def test_a_compiled_model_that_raises_falls_back_saying_what_and_where(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not "failed the check" with an empty message: the exception, and where it was raised when it says
    nothing (a bare assert inside a compiler gave "AssertionError: " on the H200 before)."""
    monkeypatch.setitem(compiler.BACKENDS, "cpu", _Raising())
    b = compiler.build(MLP(), SIG, hw=detect_hardware(), requested="cpu", mode="jit")
    assert b.compiled.mode == "eager"
    (why,) = [f for f in b.compiled.fallbacks if "eager" in f.split(":")[0]]
    assert (
        "jit -> eager: compiled model raised while checked against eager: AssertionError (no message) at"
        in why
    )
    assert "test_serving_compile.py" in why and "in run" in why


def test_eager_build_matches_module_and_reports_itself() -> None:
    torch.manual_seed(0)
    m = MLP()
    b = compiler.build(m, SIG, hw=detect_hardware(), requested="eager", warmup_batch_sizes=(1, 4))
    assert (b.compiled.backend, b.compiled.mode, b.cache_key) == ("eager", "eager", None)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        torch.testing.assert_close(b.compiled.run([x])[0], m(x))


def test_aot_on_a_known_bad_torch_goes_to_jit_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.serving.compile import inductor

    monkeypatch.setattr(inductor, "AOTI_LOAD_KNOWN_BAD", (torch.__version__[:4],))
    calls: list[str] = []
    monkeypatch.setattr(inductor, "aot_compile", lambda *a: calls.append("aot"))
    statics: list[bool] = []

    def fake_jit(req: CompileRequest, mode: str | None = None, static: bool = False) -> Any:
        statics.append(static)
        return lambda xs: (req.module(*xs),)

    monkeypatch.setattr(inductor, "jit_compile", fake_jit)
    req = CompileRequest(MLP().eval(), SIG, "aot", detect_hardware().devices["cpu"], (1,), 8, None)
    c = inductor.inductor_compile(req, "cuda", cudagraphs=True)
    assert calls == [] and c.mode == "jit"
    assert c.fallbacks and "aoti_load_package is known to crash" in c.fallbacks[0]
    assert c.batch_buckets == (1, 2, 4, 8)
    # fixed row shape: one static graph and one CUDA graph of ours per bucket; a variable sequence length
    # keeps dynamic shapes and torch.compile's own CUDA graphs (reduce-overhead)
    assert statics == [True] and "one static graph and one CUDA graph per batch bucket" in c.path
    seq = Signature((TensorSpec("ids", "INT64", (-1, -1)),), ())
    c = inductor.inductor_compile(replace(req, signature=seq), "cuda", cudagraphs=True)
    assert statics == [True, False] and "static" not in c.path and "reduce-overhead" in c.path


def test_batch_buckets_double_below_16_and_step_a_quarter_above() -> None:
    from runtime.serving.compile.inductor import batch_buckets

    assert batch_buckets(64, (1, 64)) == (1, 2, 4, 8, 16, 20, 24, 28, 32, 40, 48, 56, 64)
    assert batch_buckets(8, (1,)) == (1, 2, 4, 8)
    assert batch_buckets(1, (1,)) == (1,)
    # max_batch and warm-up sizes are buckets too, sizes past max_batch are not
    assert batch_buckets(48, (5, 100)) == (1, 2, 4, 5, 8, 16, 20, 24, 28, 32, 40, 48)
    for m in (3, 17, 64, 100, 256):
        b = batch_buckets(m, (1,))
        assert b[-1] == m and list(b) == sorted(set(b))
        # padding adds at most a quarter of the rows from 16 up (a 17-row batch pads to 20)
        assert all(min(x for x in b if x >= n) <= max(16, n * 1.25) for n in range(1, m + 1))


def test_static_jit_compiles_one_graph_per_batch_size_without_symbolic_shapes() -> None:
    """What CUDA graph buckets rely on: with static=True no graph has a symbolic batch dimension (ops
    without a symbolic implementation would break it into eager pieces); with automatic dynamic shapes the
    third size reuses a dynamic graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from runtime.serving.compile import inductor

    def graphs(static: bool) -> tuple[int, list[bool]]:
        torch._dynamo.reset()
        counters.clear()
        symbolic: list[bool] = []

        def backend(gm: torch.fx.GraphModule, example: list[Any]) -> Any:
            values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
            symbolic.append(
                any(
                    isinstance(v, torch.SymInt)
                    or any(isinstance(d, torch.SymInt) for d in getattr(v, "shape", ()))
                    for v in values
                )
            )
            return gm

        m = MLP().eval()
        req = CompileRequest(m, SIG, "jit", detect_hardware().devices["cpu"], (1,), 8, None)
        run = inductor.jit_compile(req, backend=backend, static=static)
        for n in (2, 4, 8, 4):
            x = torch.randn(n, 16)
            with torch.inference_mode():
                torch.testing.assert_close(run([x])[0], m(x))
        return len(symbolic), symbolic

    assert graphs(True) == (3, [False, False, False])
    n, symbolic = graphs(False)
    assert n == 2 and symbolic[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_cuda_graphs_per_shape_equal_eager_and_keep_each_others_outputs() -> None:
    """One graph per bucket: replays of other buckets in between neither change a bucket's results nor
    overwrite the outputs it left (they did with one memory pool shared by every graph)."""
    from runtime.serving.compile import inductor

    torch.manual_seed(0)
    m = MLP().eval().cuda()
    run = inductor.cuda_graphs(call_module(torch.compile(m, dynamic=False)))
    xs = {n: torch.randn(n, 16, device="cuda") for n in (1, 4, 8)}
    outs = {n: run([x])[0] for n, x in xs.items()}  # captures
    kept = {n: o.clone() for n, o in outs.items()}
    for _ in range(3):
        for n in (8, 1, 4):
            x = torch.randn(n, 16, device="cuda")
            got = run([x])[0]
            with torch.inference_mode():
                torch.testing.assert_close(got, m(x))
            kept[n] = got.clone()
            for other, o in outs.items():  # every bucket's static outputs still hold its own last result
                torch.testing.assert_close(o, kept[other])


@pytest.mark.skipif(
    not torch.cuda.is_available() or not detect_hardware().extras.get("tensorrt"),
    reason="needs a CUDA device and torch_tensorrt",
)
@pytest.mark.parametrize("mode", ["jit", "aot"])
def test_gpu_tensorrt_build_equals_eager_and_says_which_path(mode: str) -> None:
    """The tensorrt backend for real, where torch_tensorrt is installed (not in the lent GPU machines' image,
    so not yet run: docs/benchmarks.md): its engines answer as the eager module does at each warm-up size, and
    the build says what it ran (aot: jit, visibly)."""
    torch.manual_seed(0)
    m = MLP()
    ref = MLP()
    ref.load_state_dict(m.state_dict())  # build() moves and owns `m`
    b = compiler.build(
        m,
        SIG,
        hw=detect_hardware(),
        requested="tensorrt",
        mode=mode,
        warmup_batch_sizes=(1, 4),
        max_batch_size=4,
    )
    assert (b.compiled.backend, b.compiled.mode, b.compiled.path) == (
        "tensorrt",
        "jit",
        "torch.compile(tensorrt)",
    )
    assert not [f for f in b.compiled.fallbacks if "eager" in f.split(":")[0]], b.compiled.fallbacks
    assert (mode == "aot") == any(f.startswith("aot -> jit") for f in b.compiled.fallbacks)
    ref = ref.eval().to(b.device)
    for n in (1, 4):
        x = torch.randn(n, 16, device=b.device)
        with torch.inference_mode():
            got, want = b.compiled.run([x])[0].double(), ref(x).double()
        assert ((got - want).norm() / want.norm()).item() <= 1e-3  # the build's own check's fp32 bound
