"""Training data: a byte tokenizer, a built-in corpus, sample iteration and Megatron indexed data.

Everything here works offline: the built-in corpus ships with CPython, and indexed data goes
through megatron-core's own dataset builders so files prepared for Megatron-LM load unchanged.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import torch

__all__ = [
    "ByteTokenizer",
    "builtin_corpus",
    "builtin_documents",
    "TokenDataset",
    "builtin_datasets",
    "SampleIterator",
    "indexed_datasets",
]


class ByteTokenizer:
    """Byte-level tokenizer: ids 0..255 are UTF-8 bytes, 256 ends a document, 257 pads.

    Needs no vocabulary file and fits any model vocab of at least 258 (the tiny preset has 512).
    """

    eod = 256
    pad = 257

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids (256 bytes + eod + pad)."""
        return 258

    @property
    def eos(self) -> int:
        """Alias of `eod`, for code that asks for an end-of-sequence id."""
        return self.eod

    @property
    def unique_identifiers(self) -> dict:
        """What megatron-core hashes to name its index caches; the tokenizer has no state."""
        return {"class": type(self).__name__, "vocab_size": self.vocab_size}

    def tokenize(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` as ids."""
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text from ids; special ids are skipped and broken UTF-8 is replaced, never raised."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


def builtin_documents() -> list[str]:
    """CPython's own help topics (pydoc_data), sorted by name: English text that needs no download."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def builtin_corpus() -> str:
    """The built-in documents joined by blank lines (several hundred KB, always the same)."""
    return "\n\n".join(builtin_documents())


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length language-model samples cut from one token stream.

    Sample i reads tokens[i*s : i*s + s + 1]: inputs of consecutive samples do not overlap, and each
    window's extra last token (the final label) is the next window's first input, as in Megatron.
    """

    def __init__(self, tokens: torch.Tensor, seq_length: int):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if seq_length < 1:
            raise ValueError(f"--seq-length must be positive, got {seq_length}")
        self.tokens = tokens.long()
        self.seq_length = int(seq_length)
        self._position_ids = torch.arange(self.seq_length, dtype=torch.long)
        self._loss_mask = torch.ones(self.seq_length, dtype=torch.float)

    def __len__(self) -> int:
        return max(0, (self.tokens.numel() - 1) // self.seq_length)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        start = i * self.seq_length
        window = self.tokens[start : start + self.seq_length + 1]
        return {
            "tokens": window[:-1].clone(),
            "labels": window[1:].clone(),
            "loss_mask": self._loss_mask.clone(),
            "position_ids": self._position_ids.clone(),
        }


def builtin_datasets(seq_length: int, tokenizer=None, valid_fraction: float = 0.05):
    """(train, valid) TokenDatasets over the built-in corpus; valid is the end of the token stream.

    Each document is followed by the tokenizer's eod so the model sees document boundaries.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    tokenizer = tokenizer or ByteTokenizer()
    ids: list[int] = []
    for doc in builtin_documents():
        ids.extend(tokenizer.tokenize(doc))
        ids.append(tokenizer.eod)
    stream = torch.tensor(ids, dtype=torch.long)
    cut = int(round(stream.numel() * (1.0 - valid_fraction)))
    train_tokens, valid_tokens = stream[:cut], stream[cut:]
    if valid_tokens.numel() < seq_length + 1:
        raise ValueError(
            f"--seq-length {seq_length} is too long: the built-in validation split has only "
            f"{valid_tokens.numel()} tokens, fewer than one sample ({seq_length + 1} tokens); "
            "use a shorter --seq-length or a larger valid_fraction"
        )
    return TokenDataset(train_tokens, seq_length), TokenDataset(valid_tokens, seq_length)


class SampleIterator:
    """Endless, seeded, resumable micro-batches for one data-parallel rank.

    The global sample stream is epoch after epoch of a permutation seeded by `seed + epoch`. Each
    micro-step consumes dp_size * micro_batch_size consecutive positions of that stream; rank r takes
    the r-th block of micro_batch_size. Resuming from `consumed_samples` (a global count) continues
    exactly where an uninterrupted run would be.
    """

    def __init__(self, dataset, micro_batch_size: int, *, seed: int, dp_rank: int = 0,
                 dp_size: int = 1, consumed_samples: int = 0):
        if len(dataset) == 0:
            raise ValueError("dataset has no samples; use a shorter --seq-length or more data")
        if micro_batch_size < 1:
            raise ValueError(f"--micro-batch-size must be positive, got {micro_batch_size}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.dataset = dataset
        self.micro_batch_size = int(micro_batch_size)
        self.seed = int(seed)
        self.dp_rank = int(dp_rank)
        self.dp_size = int(dp_size)
        self.consumed_samples = int(consumed_samples)
        self._perm_epoch: Optional[int] = None
        self._perm: Optional[torch.Tensor] = None

    @property
    def global_batch_per_step(self) -> int:
        """Samples all ranks together consume per micro-step."""
        return self.micro_batch_size * self.dp_size

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

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        samples = [self.dataset[self.sample_index(start + j)] for j in range(self.micro_batch_size)]
        self.consumed_samples += self.global_batch_per_step
        return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


def indexed_datasets(data_path_prefix: str, seq_length: int, seed: int,
                     splits: Sequence[float] = (0.95, 0.05), tokenizer=None,
                     cache_dir: Optional[str] = None):
    """(train, valid) megatron-core GPTDatasets over a Megatron indexed dataset (`prefix`.bin/.idx).

    Uses megatron-core's BlendedMegatronDatasetBuilder so splitting, shuffling and caching match
    Megatron-LM. `splits` are train/valid weights over documents; one epoch is built per split.
    """
    for suffix in (".bin", ".idx"):
        path = data_path_prefix + suffix
        if not os.path.isfile(path):
            raise ValueError(f"--data-path: {path} does not exist (need both {data_path_prefix}.bin "
                             f"and {data_path_prefix}.idx)")
    if len(splits) not in (2, 3) or any(w < 0 for w in splits) or sum(splits) <= 0:
        raise ValueError(f"splits must be 2 or 3 non-negative weights, got {tuple(splits)}")
    try:
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
        from megatron.core.datasets import helpers  # noqa: F401  (compiled C++ index builder)
    except ImportError as exc:  # pragma: no cover - depends on the installed wheel
        raise RuntimeError(
            "--data-path: megatron-core's compiled dataset helpers are unavailable "
            f"({exc}); use the built-in corpus instead"
        ) from exc

    tokenizer = tokenizer or ByteTokenizer()
    weights = list(splits) + [0.0] * (3 - len(splits))
    config = GPTDatasetConfig(
        random_seed=int(seed),
        sequence_length=int(seq_length),
        blend=([data_path_prefix], None),
        split=",".join(repr(float(w)) for w in weights),
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [None, None, None], lambda: True, config)
    train, valid, _ = builder.build()
    return train, valid
