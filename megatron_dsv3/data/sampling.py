"""Seeded, resumable sample order: epoch after epoch of a permutation, consumed in data-parallel blocks.

`ShuffledSamples` is the global stream as a dataset (position i -> sample), so Megatron-LM's sequential
pretraining sampler walks exactly the stream that `SampleIterator` walks in dsv3-pretrain.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch


class ShuffledSamples(torch.utils.data.Dataset):
    """Position i of the global sample stream: epoch i // n of a permutation seeded by `seed + epoch`."""

    def __init__(self, dataset, seed: int, length: Optional[int] = None):
        if len(dataset) == 0:
            raise ValueError("dataset has no samples; use a shorter --seq-length or more data")
        self.dataset = dataset
        self.seed = int(seed)
        self.length = len(dataset) if length is None else int(length)
        self._perm_epoch: Optional[int] = None
        self._perm: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.length

    def _permutation(self, epoch: int) -> torch.Tensor:
        """The sample order of `epoch`, cached for the current epoch."""
        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(len(self.dataset), generator=gen)
            self._perm_epoch = epoch
        return self._perm

    def sample_index(self, position: int) -> int:
        """Dataset index of global stream position `position`."""
        n = len(self.dataset)
        return int(self._permutation(position // n)[position % n])

    def __getitem__(self, position: int):
        return self.dataset[self.sample_index(position)]


class SampleIterator:
    """Endless, seeded, resumable micro-batches for one data-parallel rank.

    Each micro-step consumes dp_size * micro_batch_size consecutive positions of the `ShuffledSamples`
    stream; rank r takes the r-th block of micro_batch_size (Megatron's pretraining sampler does the same).
    Resuming from `consumed_samples` (a global count) continues exactly where an uninterrupted run would be.
    """

    def __init__(self, dataset, micro_batch_size: int, *, seed: int, dp_rank: int = 0,
                 dp_size: int = 1, consumed_samples: int = 0):
        if micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be positive, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.stream = ShuffledSamples(dataset, seed)
        self.dataset = dataset
        self.micro_batch_size = int(micro_batch_size)
        self.seed = int(seed)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.consumed_samples = int(consumed_samples)

    @property
    def global_batch_per_step(self) -> int:
        """Samples all ranks together consume per micro-step."""
        return self.micro_batch_size * self.dp_size

    def sample_index(self, position: int) -> int:
        """Dataset index of global stream position `position`."""
        return self.stream.sample_index(position)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        samples = [self.stream[start + j] for j in range(self.micro_batch_size)]
        self.consumed_samples += self.global_batch_per_step
        return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}
