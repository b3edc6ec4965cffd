"""Build a megatron-core GPTModel from a DSV3Config with the registered `dsv3` spec."""
from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_dsv3 import registry, runtime
from megatron_dsv3.config import DSV3Config
from megatron_dsv3.model.backends import get_backend
from megatron_dsv3.model.transformer_config import to_mcore_config


def build_model(config: DSV3Config, backend: Optional[str] = None, *, spec: str = "dsv3",
                pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                vp_stage: Optional[int] = None, fp8_recipe=None, pg_collection=None, **mcore_overrides) -> GPTModel:
    """A GPTModel for this pipeline stage, on this rank's device; `model(input_ids, position_ids,
    attention_mask)` gives logits.

    `backend` is 'local', 'te' or None (TE when importable on a GPU). Extra keyword arguments set
    megatron-core TransformerConfig fields (bf16, fp8, recompute, ...).
    """
    if isinstance(fp8_recipe, str):  # megatron-core's own field (TE backend): fp8_recipe='blockwise', fp8='e4m3'
        mcore_overrides["fp8_recipe"], fp8_recipe = fp8_recipe, None
    elif fp8_recipe is not None:  # megatron-core's name for what the local FP8 linears run (fp8 stays None:
        mcore_overrides.update(local_fp8=fp8_recipe, fp8_recipe="blockwise")  # that field means TE's autocast)
    mcore_config = to_mcore_config(config, **mcore_overrides)
    chosen = get_backend(backend, fp8_recipe=fp8_recipe)  # an FP8Config: local block-scaled FP8 linears
    model_spec = registry.get(spec)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=mcore_config,
        transformer_layer_spec=model_spec.decoder_block_spec(mcore_config, chosen, vp_stage=vp_stage),
        vocab_size=config.vocab_size,
        max_sequence_length=config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="rope",  # MLA applies its own (decoupled) RoPE; GPTModel adds none
        mtp_block_spec=model_spec.mtp_block_spec(mcore_config, chosen, vp_stage=vp_stage),
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    model.dsv3_config = config
    if any(p.is_meta for p in model.parameters()):  # built for counting or deferred initialisation
        return model
    # On the rank's device, as Megatron-LM's get_model moves it: megatron-core creates torch norms on the CPU
    # whatever the config says (a no-op on CPU machines).
    return model.to(runtime.device())
