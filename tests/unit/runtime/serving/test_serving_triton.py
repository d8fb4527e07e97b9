"""Triton's model configuration and statistics extensions (protocol.triton), from the server's metrics."""

from __future__ import annotations

import time

from runtime.serving.batching import Batcher
from runtime.serving.metrics import Metrics, merge
from runtime.serving.model import Repository, ServedModel
from runtime.serving.protocol.triton import Extensions, dynamic_batching, model_config, statistics
from runtime.serving.signature import Signature, TensorSpec


def _model(batched: bool = True) -> ServedModel:
    first = (-1,) if batched else ()
    sig = Signature(
        (TensorSpec("ids", "INT64", (*first, 128)), TensorSpec("mask", "BF16", (*first, 128))),
        (TensorSpec("pooled", "FP32", (*first, 768)),),
    )
    batcher = Batcher(lambda xs: (xs[0],), max_batch_size=8)
    batcher.close(5)
    info = {"backend": "cuda", "fallbacks": ["aot -> jit: why", "x"], "cache_hit": True}
    return ServedModel("bert", "3", sig, batcher, 8 if batched else 1, info=info)


def test_statistics_count_requests_rows_batches_and_failures_from_the_metrics_of_every_process() -> None:
    """Two processes' expositions, merged as /metrics merges them: successes over REST (200) and gRPC (OK),
    failures of any other status, rows and batches run, per-request queue and compute time, batches by
    rows; nothing of another model leaks in."""
    model_process, worker = Metrics(), Metrics()
    observe = model_process.observer("bert")
    t0 = time.time()
    observe(3, 2, 0.004, 0.005, 0.010, 0.009)  # a batch of 3 rows from 2 requests: they waited 5 ms together
    observe(1, 1, 0.001, 0.001, 0.002, 0.002)
    observe(3, 3, 0.002, 0.003, 0.008, 0.008)
    model_process.observer("other")(5, 5, 0.1, 0.5, 1.0, 1.0)
    for code, seconds in (("200", 0.020), ("200", 0.010), ("429", None), ("504", None)):
        worker.answered("bert", "rest", code, seconds)
    worker.answered("bert", "grpc", "OK", 0.030)
    worker.answered("bert", "grpc", "RESOURCE_EXHAUSTED", None)
    worker.answered("other", "rest", "200", 1.0)

    (s,) = statistics(merge([model_process.render(), worker.render()]), [_model()])["model_stats"]
    assert (s["name"], s["version"], s["inference_count"], s["execution_count"]) == ("bert", "3", 7, 3)
    assert int(t0 * 1000) <= s["last_inference"] <= int(time.time() * 1000)
    st = s["inference_stats"]
    assert st["success"] == {"count": 3, "ns": 60_000_000}
    assert st["fail"] == {"count": 3, "ns": 0}
    assert st["queue"] == {"count": 6, "ns": 9_000_000}
    # each request counts its batch's run time: 2 x 10 ms + 1 x 2 ms + 3 x 8 ms
    assert st["compute_infer"] == {"count": 6, "ns": 46_000_000}
    assert st["compute_input"] == st["compute_output"] == {"count": 6, "ns": 0}
    batches = {b["batch_size"]: b["compute_infer"] for b in s["batch_stats"]}
    assert batches == {1: {"count": 1, "ns": 2_000_000}, 3: {"count": 2, "ns": 18_000_000}}


def test_a_model_that_ran_nothing_has_zero_statistics() -> None:
    (s,) = statistics(Metrics().render(), [_model()])["model_stats"]
    assert (s["inference_count"], s["execution_count"], s["last_inference"], s["batch_stats"]) == (
        0,
        0,
        0,
        [],
    )
    assert s["inference_stats"]["success"] == {"count": 0, "ns": 0}


def test_model_config_gives_triton_dims_datatypes_batching_and_how_the_model_was_compiled() -> None:
    batching = dynamic_batching(2.0, 1024, 250.0, 3, 0)
    assert batching == {
        "max_queue_delay_microseconds": 2000,
        "default_queue_policy": {
            "max_queue_size": 1024,
            "default_timeout_microseconds": 250_000,
            "allow_timeout_override": True,
        },
        "priority_levels": 3,
        "default_priority_level": 3,  # 0 named none: the last level
    }
    c = model_config(_model(), batching)
    assert (c["name"], c["max_batch_size"], c["dynamic_batching"]) == ("bert", 8, batching)
    assert c["input"] == [
        {"name": "ids", "data_type": "TYPE_INT64", "dims": [128]},  # without the batch dimension
        {"name": "mask", "data_type": "TYPE_BF16", "dims": [128]},
    ]
    assert c["parameters"]["fallbacks"] == {"string_value": "aot -> jit: why | x"}
    assert c["parameters"]["cache_hit"] == {"string_value": "True"}
    unbatched = model_config(_model(batched=False), batching)
    assert unbatched["max_batch_size"] == 0 and "dynamic_batching" not in unbatched
    assert unbatched["output"] == [{"name": "pooled", "data_type": "TYPE_FP32", "dims": [768]}]
    assert "priority_levels" not in dynamic_batching(2.0, 1024, 0.0, 0, 0)


def test_the_repository_index_gives_each_model_its_state_and_the_ready_filter_keeps_the_ready() -> None:
    model = _model()
    ext = Extensions(Repository([model]), Metrics(), {})
    model.ready = False  # compiling
    assert ext.index() == [
        {
            "name": "bert",
            "version": "3",
            "state": "UNAVAILABLE",
            "reason": "compiling or warming up; not ready yet",
        }
    ]
    assert ext.index(ready_only=True) == []
    model.ready = True
    assert ext.index() == ext.index(ready_only=True) == [{"name": "bert", "version": "3", "state": "READY"}]
