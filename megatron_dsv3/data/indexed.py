"""Megatron indexed data (`prefix`.bin/.idx) through megatron-core's own dataset builders."""
from __future__ import annotations

import os
from typing import Optional, Sequence

from megatron_dsv3.data.tokenizer import ByteTokenizer


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
