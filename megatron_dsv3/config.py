"""DeepSeek-V3 model configuration: DeepSeek/Hugging Face field names, validated once, mapped to megatron-core."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional


# DeepSeek's `topk_method`: noaux_tc (V3: a group scores the sum of its two best biased affinities),
# group_limited_greedy (V2: a group scores its best affinity), greedy (no group limit).
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction 0.1 * mscale * ln(scale) + 1 (1 when the context is not extended)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class YarnConfig:
    """YaRN context extension, as in DeepSeek's `rope_scaling` (HF `rope_parameters` with rope_type 'yarn')."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: Optional[float] = 1.0
    mscale_all_dim: Optional[float] = 1.0
    attention_factor: Optional[float] = None  # cos/sin multiplier; derived as Hugging Face does when None

    def rope_attention_factor(self) -> float:
        """Multiplier on cos/sin of the rope part (Hugging Face `_compute_yarn_parameters` semantics)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_get_mscale(self.factor, self.mscale) / yarn_get_mscale(self.factor, self.mscale_all_dim)
        return yarn_get_mscale(self.factor)

    def softmax_mscale(self) -> float:
        """Factor whose square multiplies the softmax scale (uses mscale_all_dim, not mscale)."""
        return yarn_get_mscale(self.factor, self.mscale_all_dim) if self.mscale_all_dim else 1.0


@dataclass(frozen=True)
class DSV3Config:
    """A DeepSeek-V3 architecture plus the training-time constants of the report.

    Field names follow DeepSeek's `config.json` (and `transformers.DeepseekV3Config`) so users can read them
    off a public checkpoint. Parallel sizes live here too because divisibility is part of validity.
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"  # group score: V3's sum of the top-2 biased scores; V2's group maximum
    first_k_dense_replace: int = 3
    num_nextn_predict_layers: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 163840
    rope_scaling: Optional[YarnConfig] = field(default_factory=YarnConfig)
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    # Training recipe (report section 2).
    bias_update_speed: float = 1e-3  # gamma of auxiliary-loss-free balancing
    seq_aux_alpha: float = 1e-4  # sequence-wise balance loss weight
    mtp_loss_weight: float = 0.1  # lambda; L_MTP = lambda / D * sum_k L_MTP^k
    # Parallelism.
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    first_pipeline_stage_layers: Optional[int] = None  # uneven pipelines (61 layers over PP16, say)
    last_pipeline_stage_layers: Optional[int] = None

    def __post_init__(self):
        _validate(self)

    def replace(self, **changes) -> "DSV3Config":
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def moe_layer_pattern(self) -> list[int]:
        """1 for a MoE layer, 0 for a dense one (the first `first_k_dense_replace` layers)."""
        if self.n_routed_experts == 0:
            return [0] * self.num_hidden_layers
        return [0 if i < self.first_k_dense_replace else 1 for i in range(self.num_hidden_layers)]

    def softmax_scale(self) -> float:
        """Attention softmax scale: d^-0.5 times YaRN's mscale(s, mscale_all_dim) squared."""
        mscale = self.rope_scaling.softmax_mscale() if self.rope_scaling else 1.0
        return mscale * mscale / math.sqrt(self.qk_head_dim)


def _fail(field_name: str, message: str):
    raise ValueError(f"DSV3Config.{field_name}: {message}")


def _check_types(obj, prefix: str) -> None:
    """Each field holds its declared type: bool is not an int, NaN and infinities are not floats here."""
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), str(f.type)
        optional = kind.startswith("Optional[")
        kind = kind[len("Optional["):-1] if optional else kind
        if value is None:
            if not optional:
                _fail(f"{prefix}{f.name}", f"expected {kind}, got None")
            continue
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        else:
            continue  # nested configs are checked by their own validation
        if not ok:
            finite = " (finite)" if kind == "float" else ""
            _fail(f"{prefix}{f.name}", f"expected {kind}{finite}, got {value!r} ({type(value).__name__})")


def _validate(c: DSV3Config) -> None:
    _check_types(c, "")
    if isinstance(c.rope_scaling, YarnConfig):
        _check_types(c.rope_scaling, "rope_scaling.")
    positive = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    ]
    for name in positive:
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(name, f"expected a positive integer, got {value!r}")
    if c.q_lora_rank is not None and (not isinstance(c.q_lora_rank, int) or c.q_lora_rank <= 0):
        _fail("q_lora_rank", f"expected a positive integer or None, got {c.q_lora_rank!r}")
    if c.qk_rope_head_dim % 2:
        _fail("qk_rope_head_dim", f"rotary dims must be even, got {c.qk_rope_head_dim}")
    if c.num_attention_heads % c.tensor_model_parallel_size:
        _fail("num_attention_heads", f"{c.num_attention_heads} heads are not divisible by "
              f"tensor_model_parallel_size={c.tensor_model_parallel_size}")
    if c.rms_norm_eps <= 0 or c.rope_theta <= 0 or c.initializer_range <= 0:
        bad = next(n for n in ("rms_norm_eps", "rope_theta", "initializer_range") if getattr(c, n) <= 0)
        _fail(bad, f"must be > 0, got {getattr(c, bad)}")
    if not 0 <= c.first_k_dense_replace <= c.num_hidden_layers:
        _fail("first_k_dense_replace", f"must be in [0, num_hidden_layers={c.num_hidden_layers}], "
              f"got {c.first_k_dense_replace}")
    if c.num_nextn_predict_layers < 0:
        _fail("num_nextn_predict_layers", f"must be >= 0, got {c.num_nextn_predict_layers}")
    _validate_pipeline_split(c)
    if c.bias_update_speed < 0 or c.seq_aux_alpha < 0 or c.mtp_loss_weight < 0:
        bad = next(n for n in ("bias_update_speed", "seq_aux_alpha", "mtp_loss_weight") if getattr(c, n) < 0)
        _fail(bad, f"must be >= 0, got {getattr(c, bad)}")
    _validate_moe(c)
    _validate_yarn(c)


def _validate_pipeline_split(c: DSV3Config) -> None:
    """Layers must split evenly over the stages left after any explicitly sized first/last stage."""
    pp, layers = c.pipeline_model_parallel_size, c.num_hidden_layers
    fixed = [n for n in (c.first_pipeline_stage_layers, c.last_pipeline_stage_layers) if n is not None]
    for name in ("first_pipeline_stage_layers", "last_pipeline_stage_layers"):
        value = getattr(c, name)
        if value is not None and (pp == 1 or not isinstance(value, int) or value < 0):
            _fail(name, f"needs pipeline_model_parallel_size > 1 and a count >= 0, got {value}")
    rest, stages = layers - sum(fixed), pp - len(fixed)
    if rest < 0 or (stages == 0 and rest) or (stages and rest % stages):
        _fail("num_hidden_layers", f"{layers} layers do not split evenly over pipeline_model_parallel_size={pp}"
              + (f" with {fixed} layers on the first/last stages" if fixed else
                 " (set first/last_pipeline_stage_layers for an uneven split)"))


def _validate_moe(c: DSV3Config) -> None:
    if c.n_routed_experts < 0:
        _fail("n_routed_experts", f"must be >= 0, got {c.n_routed_experts}")
    if c.n_routed_experts == 0:
        return
    if c.first_k_dense_replace == c.num_hidden_layers:
        return  # every layer dense: the MoE fields are unused
    if c.moe_intermediate_size <= 0:
        _fail("moe_intermediate_size", f"expected a positive integer, got {c.moe_intermediate_size}")
    if c.n_shared_experts < 0:
        _fail("n_shared_experts", f"must be >= 0, got {c.n_shared_experts}")
    if c.scoring_func not in ("sigmoid", "softmax"):
        _fail("scoring_func", f"expected 'sigmoid' or 'softmax', got {c.scoring_func!r}")
    if c.topk_method not in TOPK_METHODS:
        _fail("topk_method", f"expected one of {', '.join(TOPK_METHODS)}, got {c.topk_method!r}")
    if c.routed_scaling_factor <= 0:
        _fail("routed_scaling_factor", f"must be > 0, got {c.routed_scaling_factor}")
    if c.n_routed_experts % c.expert_model_parallel_size:
        _fail("n_routed_experts", f"{c.n_routed_experts} experts are not divisible by "
              f"expert_model_parallel_size={c.expert_model_parallel_size}")
    if c.n_group <= 0 or c.n_routed_experts % c.n_group:
        _fail("n_group", f"must be a positive divisor of n_routed_experts={c.n_routed_experts}, got {c.n_group}")
    if not 1 <= c.topk_group <= c.n_group:
        _fail("topk_group", f"must be in [1, n_group={c.n_group}], got {c.topk_group}")
    per_group = c.n_routed_experts // c.n_group
    if not 1 <= c.num_experts_per_tok <= c.topk_group * per_group:
        _fail("num_experts_per_tok", f"must be in [1, topk_group * experts per group = "
              f"{c.topk_group * per_group}], got {c.num_experts_per_tok}")


def _validate_yarn(c: DSV3Config) -> None:
    y = c.rope_scaling
    if y is None:
        return
    if not isinstance(y, YarnConfig):
        _fail("rope_scaling", f"expected a YarnConfig or None, got {type(y).__name__}")
    if not y.factor > 0:
        _fail("rope_scaling.factor", f"YaRN factor must be > 0, got {y.factor}")
    if y.original_max_position_embeddings <= 0:
        _fail("rope_scaling.original_max_position_embeddings",
              f"must be > 0, got {y.original_max_position_embeddings}")
    if not y.beta_fast > 0 or not y.beta_slow > 0:
        _fail("rope_scaling.beta_fast", f"beta_fast and beta_slow must be > 0, got {y.beta_fast}, {y.beta_slow}")
    for name in ("mscale", "mscale_all_dim", "attention_factor"):
        value = getattr(y, name)
        if value is not None and value < 0:
            _fail(f"rope_scaling.{name}", f"must be >= 0, got {value}")
    if y.attention_factor is not None and y.factor <= 1 and y.attention_factor != 1:
        _fail("rope_scaling.attention_factor", "an explicit attention_factor needs factor > 1")
