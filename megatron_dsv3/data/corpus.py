"""The built-in corpus (CPython's own help topics: English text, no download) as fixed-length samples."""
from __future__ import annotations

import torch

from megatron_dsv3.data.tokenizer import ByteTokenizer


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
