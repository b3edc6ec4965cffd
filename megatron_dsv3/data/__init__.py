"""Training data: tokenizers, the built-in corpus, seeded sample order and Megatron indexed data.

Everything works offline: the built-in corpus ships with CPython, and indexed data goes through
megatron-core's own dataset builders so files prepared for Megatron-LM load unchanged.
"""
from megatron_dsv3.data.corpus import TokenDataset, builtin_corpus, builtin_datasets, builtin_documents
from megatron_dsv3.data.indexed import indexed_datasets
from megatron_dsv3.data.sampling import SampleIterator, ShuffledSamples
from megatron_dsv3.data.tokenizer import ByteTokenizer, HFTokenizer, make_tokenizer

__all__ = ["ByteTokenizer", "HFTokenizer", "make_tokenizer", "builtin_documents", "builtin_corpus",
           "TokenDataset", "builtin_datasets", "SampleIterator", "ShuffledSamples", "indexed_datasets"]
