"""Built-in datasets and the step sampler.

The samples of a step are a pure function of (seed, step): global sample positions ``step * B .. step * B
+ B``
map to dataset indices through a seeded per-epoch permutation; data-parallel rank r takes the r-th slice.
So any layout, a resumed job and a job that changed world size all see the same global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

Sample = tuple[torch.Tensor, torch.Tensor]
_PERMUTE_LIMIT = 10_000_000  # datasets larger than this are already random (synthetic): no permutation


class SyntheticTokens(Dataset[Sample]):
    """Arithmetic token sequences ``x[t] = (x0 + k * t) mod V`` (k in 1..8 per sample) with 10 % random
    tokens:
    cheap to generate and learnable (the next token follows from the two before it)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, size: int = 1 << 40) -> None:
        self.vocab, self.seq_len, self.seed, self.size = vocab_size, seq_len, seed, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = self.seq_len + 1
        x0, k = torch.randint(self.vocab, (1,), generator=g), torch.randint(1, 9, (1,), generator=g)
        seq = (x0 + k * torch.arange(n)) % self.vocab
        noise = torch.rand(n, generator=g) < 0.1
        seq = torch.where(noise, torch.randint(self.vocab, (n,), generator=g), seq)
        return seq[:-1], seq[1:]


class ByteText(Dataset[Sample]):
    """A local text file read as bytes (vocabulary 256); sample i is a window at a seeded offset."""

    def __init__(self, path: str, seq_len: int, seed: int = 0) -> None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"spec.data.path {path!r} is not a readable file")
        raw = p.read_bytes()
        if len(raw) < seq_len + 2:
            raise ValueError(
                f"spec.data.path {path!r} has {len(raw)} bytes; sequenceLength {seq_len} needs more"
            )
        self.data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
        self.seq_len, self.seed = seq_len, seed
        self.windows = len(raw) - seq_len - 1

    def __len__(self) -> int:
        return self.windows

    def __getitem__(self, index: int) -> Sample:
        chunk = self.data[index : index + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


class Digits(Dataset[Sample]):
    """scikit-learn's bundled 8x8 digit images (1,797 samples, 10 classes) as (1, 8, 8) float tensors."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        self.x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        self.y = torch.tensor(d.target, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> Sample:
        return self.x[index], self.y[index]


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def global_indices(step: int, global_batch: int, size: int, seed: int) -> list[int]:
    """Dataset indices of the global batch of ``step`` (0-based)."""
    out = []
    for pos in range(step * global_batch, (step + 1) * global_batch):
        if size > _PERMUTE_LIMIT:
            out.append(pos % size)
        else:
            epoch, off = divmod(pos, size)
            out.append(int(_permutation(size, seed, epoch)[off]))
    return out


class StepSampler(Sampler[list[int]]):
    """Yields, for each step from ``start``, this data-parallel rank's slice of the global batch."""

    def __init__(self, size: int, global_batch: int, dp_rank: int, dp: int, seed: int, start: int, stop: int):
        self.size, self.gb, self.dp_rank, self.dp = size, global_batch, dp_rank, dp
        self.seed, self.start, self.stop = seed, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        local = self.gb // self.dp
        for step in range(self.start, self.stop):
            idx = global_indices(step, self.gb, self.size, self.seed)
            yield idx[self.dp_rank * local : (self.dp_rank + 1) * local]


def step_batches(
    dataset: Dataset[Sample],
    global_batch: int,
    dp_rank: int,
    dp: int,
    seed: int,
    start: int,
    stop: int,
    num_workers: int = 0,
) -> Iterator[Sample]:
    """(inputs, targets) of this rank for each step in [start, stop)."""
    sampler = StepSampler(len(dataset), global_batch, dp_rank, dp, seed, start, stop)  # type: ignore[arg-type]
    if num_workers == 0:
        for idx in sampler:
            yield default_collate([dataset[i] for i in idx])  # type: ignore[no-untyped-call]
        return
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=False)
    yield from loader
