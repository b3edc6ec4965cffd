"""Inference for dsv3 models: MLA absorbed latent cache, greedy/sampled decoding, MTP speculative decoding."""
from megatron_dsv3.inference.generate import GenerationOutput, InferenceEngine, sample_next
from megatron_dsv3.inference.latent_cache import LatentCache
from megatron_dsv3.inference.speculative import speculative_generate

__all__ = ["GenerationOutput", "InferenceEngine", "LatentCache", "sample_next", "speculative_generate"]
