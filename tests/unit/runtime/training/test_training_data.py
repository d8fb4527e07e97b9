"""Data: the samples of a step depend on (seed, step) only, whatever the data-parallel split."""

from __future__ import annotations

import torch

from runtime.training.data import Digits, StepSampler, SyntheticTokens, global_indices, step_batches


def test_data_parallel_slices_partition_the_global_batch() -> None:
    whole = list(StepSampler(1000, 8, 0, 1, seed=3, start=0, stop=5))
    for dp in (2, 4, 8):
        parts = [list(StepSampler(1000, 8, r, dp, seed=3, start=0, stop=5)) for r in range(dp)]
        for step in range(5):
            assert [i for p in parts for i in p[step]] == whole[step]


def test_resume_sees_the_same_batches() -> None:
    full = list(StepSampler(50, 4, 0, 1, seed=0, start=0, stop=30))
    assert list(StepSampler(50, 4, 0, 1, seed=0, start=17, stop=30)) == full[17:]


def test_epochs_are_permutations() -> None:
    idx = [i for s in range(10) for i in global_indices(s, 5, 50, seed=1)]
    assert sorted(idx) == list(range(50))
    assert idx != list(range(50))


def test_synthetic_tokens_are_deterministic_and_shifted() -> None:
    ds = SyntheticTokens(vocab_size=64, seq_len=16, seed=2)
    x, y = ds[7]
    assert x.shape == y.shape == (16,) and int(x.max()) < 64
    assert torch.equal(x[1:], y[:-1])
    assert torch.equal(ds[7][0], x) and not torch.equal(ds[8][0], x)


def test_digits_batches() -> None:
    ds = Digits()
    assert len(ds) == 1797
    x, y = next(step_batches(ds, 16, dp_rank=1, dp=2, seed=0, start=0, stop=1))
    assert x.shape == (8, 1, 8, 8) and y.shape == (8,) and float(x.max()) <= 1.0
