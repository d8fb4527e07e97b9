"""A model built on the meta device and filled by parallel.materialize (in one process; the sharded layouts
are the equivalence tests': a wrong shard moves their losses at once)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint import state_dict_saver

from crds.trainingjob import TrainingJobSpec
from runtime.training.checkpoint import load_model_weights
from runtime.training.models.llama import Transformer, build_task, llama_args
from runtime.training.parallel.materialize import canonical, materialize, on_meta, to_device

CPU = torch.device("cpu")


def _spec(seed: int = 7) -> TrainingJobSpec:
    return TrainingJobSpec.model_validate(
        {
            "model": {"builtin": "llama", "preset": "tiny", "options": {"dim": 32, "layers": 2, "heads": 4}},
            "data": {"builtin": "synthetic-tokens", "sequenceLength": 16, "vocabSize": 64},
            "optimizer": {"seed": seed},
        }
    )


def test_the_builtin_llama_is_built_on_meta_and_filled_as_the_cpu_build() -> None:
    """No storage until it is filled; then every parameter and buffer (RoPE's tables too, which no checkpoint
    holds) equals the model built on the CPU with the same seed."""
    task = build_task(_spec())
    assert on_meta(task.model) and to_device(task.model, CPU) is task.model  # .to() would fail on meta
    materialize(task.model, CPU, task.init_weights)
    assert not on_meta(task.model)
    on_cpu = Transformer(llama_args(_spec()), seed=7)
    got, want = task.model.state_dict(keep_vars=True), on_cpu.state_dict(keep_vars=True)
    assert list(got) == list(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    for name in ("rope_cos", "rope_sin"):
        assert torch.equal(getattr(task.model, name), getattr(on_cpu, name))
    # each tensor has its own draw: another seed changes the weights, not the norms
    other = Transformer(llama_args(_spec(8)), seed=8)
    assert not torch.equal(other.layers["0"].attention.wq.weight, on_cpu.layers["0"].attention.wq.weight)
    assert torch.equal(other.norm.weight, on_cpu.norm.weight)  # type: ignore[union-attr]


def test_wrapped_names_are_filled_by_the_unwrapped_name() -> None:
    """Activation checkpointing, torch.compile and DDP rename parameters; the init gets the model's own."""
    assert (
        canonical("layers.0._checkpoint_wrapped_module.attention.wq.weight") == "layers.0.attention.wq.weight"
    )
    assert canonical("module._orig_mod.output.weight") == "output.weight"
    with torch.device("meta"):
        model = nn.Sequential(checkpoint_wrapper(nn.Linear(3, 2)))
    seen: list[str] = []

    def init(name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        assert device == CPU
        seen.append(name)
        return torch.full(shape, 3.0)

    materialize(model, CPU, init)
    assert sorted(seen) == ["0.bias", "0.weight"]
    assert torch.equal(model[0].weight, torch.full((2, 3), 3.0))
    materialize(model, CPU, None)  # nothing on meta: nothing to do, no init needed


def test_a_meta_model_without_an_init_or_with_a_wrong_shape_says_what_to_fix() -> None:
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"TrainTask\.init_weights"):
        materialize(model, CPU, None)
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"init_weights\('weight'\) gave shape \(3, 2\), expected \(2, 3\)"):
        materialize(model, CPU, lambda name, shape, device: torch.zeros(tuple(reversed(shape))))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_the_copy_kept_to_log_the_model_is_filled_from_the_last_checkpoint(tmp_path: Path) -> None:
    """Rank 0's unsharded copy stays on meta for the whole job; at the end it gets storage, RoPE's tables
    (no checkpoint holds them) and the checkpoint's weights, and answers as the trained model does."""
    spec = _spec()
    task = build_task(spec)
    plain = copy.deepcopy(task.model)
    assert on_meta(plain)
    trained = Transformer(llama_args(spec), seed=3)  # other weights than the init's
    state_dict_saver.save(
        {"model": trained.state_dict()}, checkpoint_id=str(tmp_path / "step-9"), no_dist=True
    )
    materialize(plain, CPU, task.init_weights)
    load_model_weights(plain, str(tmp_path / "step-9"))
    x = torch.randint(0, 64, (2, 16))
    assert torch.equal(plain(x), trained(x))
