"""Tokenizers for the datasets: a byte-level one that needs no files, and a local Hugging Face one."""
from __future__ import annotations

from typing import Sequence


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


class HFTokenizer:
    """A local Hugging Face tokenizer in the interface the datasets use (tokenize, eod, vocab_size)."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:  # transformers raises many types for a bad path
            raise ValueError(f"--tokenizer-model: cannot load a Hugging Face tokenizer from {path!r} ({err})") from None
        self.eod = self._tok.eos_token_id if self._tok.eos_token_id is not None else 0
        self.pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eod
        self.vocab_size = len(self._tok)
        self.unique_identifiers = {"class": "HFTokenizer", "path": path}

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def detokenize(self, ids) -> str:
        return self._tok.decode(ids)


def make_tokenizer(tokenizer_type=None, tokenizer_model=None):
    """Byte-level by default; `--tokenizer-type HuggingFaceTokenizer --tokenizer-model PATH` otherwise.
    Bad choices raise ValueError naming the flag."""
    if tokenizer_type in (None, "ByteTokenizer"):
        return ByteTokenizer()
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise ValueError("--tokenizer-model: required with --tokenizer-type HuggingFaceTokenizer")
        return HFTokenizer(tokenizer_model)
    raise ValueError(f"--tokenizer-type: {tokenizer_type!r} is not supported; use the byte tokenizer (default) "
                     "or HuggingFaceTokenizer")
