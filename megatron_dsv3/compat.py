"""The one place where megatron-core (and Megatron-LM's training loop) is worked around.

`apply_cpu_patches()` adapts megatron-core to CPU-only machines (gloo, no CUDA); `runtime.initialize` calls it
only when CUDA is absent. Two workarounds hold on any machine: `PassesAsColumnParallelLinear` (a strict spec
check in MLA) and `route_megatron_lm_schedule` (Megatron-LM's loop has no schedule hook). Importing this
module changes nothing. Each workaround names the megatron-core 0.19 / Megatron-LM code it works around.
"""
from __future__ import annotations

import contextlib
import re
import types

import torch

_APPLIED = False


class PassesAsColumnParallelLinear(type):
    """Metaclass for a linear that megatron-core's MLA must accept as its q/kv down projection.

    transformer/multi_latent_attention.py MLASelfAttention.__init__ accepts `submodules.linear_*_down_proj`
    only if it is `in [Linear, TEColumnParallelLinear, ColumnParallelLinear]` (equality, not issubclass), so
    a subclass such as the FP8 down projection compares equal to `ColumnParallelLinear` and is otherwise itself.
    """

    def __eq__(cls, other):
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear

        return other is ColumnParallelLinear or type.__eq__(cls, other) is True

    def __ne__(cls, other):
        return not cls.__eq__(other)

    __hash__ = type.__hash__


def _load_bytes_without_code(planner, read_item, value) -> None:
    """torch/distributed/checkpoint/default_planner.py DefaultLoadPlanner.load_bytes (inherited by megatron-core's
    dist_checkpointing/strategies/torch.py MCoreLoadPlanner) unpickles a checkpoint's non-tensor items with
    `torch.load(weights_only=False)`, which runs whatever a file holds: loaded with weights_only=True instead
    (tensors, containers and numbers; megatron-core's BytesIO-wrapped objects allowed)."""
    import io

    from torch.distributed.checkpoint._traverse import set_element

    with torch.serialization.safe_globals([io.BytesIO]):
        obj = torch.load(value, weights_only=True)
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[read_item.dest_index.fqn], obj)
    else:
        planner.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def in_process_write_results():
    """While active, megatron-core's synchronous checkpoint writes collect their results in a plain queue.

    dist_checkpointing/strategies/filesystem_async.py get_write_results_queue starts a multiprocessing Manager
    (a spawned server process, plus Python's resource tracker) for a queue that a synchronous save only uses
    from this process's writer threads: the processes cost seconds per save and outlive a kill -9."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original = filesystem_async.get_write_results_queue
    filesystem_async.get_write_results_queue = lambda *args, **kwargs: queue.Queue()
    try:
        yield
    finally:
        filesystem_async.get_write_results_queue = original


def load_checkpoint_objects_without_code() -> None:
    """Route megatron-core's checkpoint loads through `_load_bytes_without_code` (any machine). Idempotent."""
    from megatron.core.dist_checkpointing.strategies.torch import MCoreLoadPlanner

    MCoreLoadPlanner.load_bytes = _load_bytes_without_code


def uncompiled(function):
    """The eager function behind a torch.compile'd one. megatron/core/jit.py makes `jit_fuser` torch.compile,
    and transformer/moe/router.py TopKRouter._apply_expert_bias (one sum and one add per MoE layer) carries
    it: compiling costs ~1 s per training process (inductor builds C++ on CPU) and a guard check per call."""
    return getattr(function, "__wrapped__", function)


def list_balancing_types_for_logging(args) -> None:
    """megatron/training/training.py training_log picks the MoE losses to report with
    `"aux_loss" in args.moe_router_load_balancing_type`, a substring test once validate_args has turned a
    one-element list into a string, so `seq_aux_loss` also reports an unused `load_balancing_loss: 0`; as a
    list the test is membership. (The model's config is built before this and keeps the string.)"""
    kind = args.moe_router_load_balancing_type
    if isinstance(kind, str):
        args.moe_router_load_balancing_type = [kind]


def route_megatron_lm_schedule(forward_backward_func) -> None:
    """Make Megatron-LM's training loop run `forward_backward_func` (e.g. DualPipe).

    megatron/training/training.py imports `get_forward_backward_func` by name (`from
    megatron.core.pipeline_parallel import ...`) and calls it in `train()` and `evaluate()` after the model
    is built, with no parameter to pass another schedule: its module-level name is rebound here.
    """
    import megatron.training.training as megatron_training

    megatron_training.get_forward_backward_func = lambda *args, **kwargs: forward_backward_func


class CPURNGStatesTracker:
    """Named RNG streams on the CPU generator, standing in for megatron-core's CudaRNGStatesTracker.

    Works around megatron/core/tensor_parallel/random.py `CudaRNGStatesTracker.add` and `.fork`, which
    read and write `torch.cuda` RNG states.
    """

    def __init__(self, **_):
        self.reset()

    def reset(self):
        self.states_, self.seeds_, self._is_initialized = {}, set(), False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized, self.states_ = True, dict(states)

    def add(self, name, seed):
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG stream {name!r} or seed {seed} already registered")
        self._is_initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise ValueError(f"RNG stream {name!r} was not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _current_device_cpu() -> str:
    return "cpu"


class _CPUEvent:
    """A completed event: CPU work is synchronous."""

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True


class _CPUStream:
    """Stand-in for torch.cuda.Stream: CPU ops run in order, so waits and events are no-ops."""

    def __init__(self, *_, **__):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _CPUEvent()

    def synchronize(self):
        pass


_DEFAULT_STREAM = _CPUStream()


class _CudaTypeNames(torch.overrides.TorchFunctionMode):
    """While active, CPU tensors name their type as the CUDA one (`t.type()` == 'torch.cuda.FloatTensor')."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """optimizer/clip_grads.py clip_grad_by_total_norm_fp32 without its `torch.cuda.FloatTensor` assert."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
    elif clip_coeff >= 1.0:
        return
    torch._foreach_mul_(grads, clip_coeff)


def _with_cuda_type_names(fn):
    """Run a megatron-core function that checks `param.type()` against CUDA type names."""

    def wrapped(*args, **kwargs):
        with _CudaTypeNames():
            return fn(*args, **kwargs)

    wrapped.__wrapped__ = fn
    return wrapped


class _FusedWgradAccumulationOnCPU:
    """fused_weight_gradient_mlp_cuda's two kernels: main_grad += dY^T X, products and sums in FP32."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input, grad_output, main_grad):
        main_grad.addmm_(grad_output.t().float(), total_input.float())

    @staticmethod
    def wgrad_gemm_accum_fp16(total_input, grad_output, main_grad):
        main_grad.add_(grad_output.t().float().matmul(total_input.float()).to(main_grad.dtype))


def _split_sizes_as_lists(all_to_all):
    """gloo's all_to_all_single accepts split sizes only as Python lists of ints."""

    def wrapped(group, input_, output_split_sizes_=None, input_split_sizes=None, use_nccl_stream=False):
        as_list = lambda sizes: None if sizes is None else [int(n) for n in sizes]  # noqa: E731
        return all_to_all(group, input_, as_list(output_split_sizes_), as_list(input_split_sizes), use_nccl_stream)

    return wrapped


def _on_cpu(factory):
    """A tensor factory that builds on the CPU where the caller asked for a CUDA device."""

    def build(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    build.__wrapped__ = factory
    return build


_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
              "zeros_like", "ones_like", "empty_like", "full_like")


class _CudaOnCPU(types.ModuleType):
    """`torch.cuda` as megatron.training sees it without a GPU: one device, the CPU, whose streams, caches,
    RNG and memory statistics are no-ops or zeros; anything else is torch.cuda's own."""

    def __init__(self):
        super().__init__("torch.cuda")
        none = lambda *args, **kwargs: None  # noqa: E731
        zero = lambda *args, **kwargs: 0  # noqa: E731
        for name in ("set_device", "synchronize", "empty_cache", "set_rng_state", "set_stream", "reset_peak_memory_stats"):
            setattr(self, name, none)
        for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved",
                     "device_memory_used"):
            setattr(self, name, zero)
        self.is_available = lambda: False
        self.device_count = lambda: 1  # initialize.py builds the parallel groups and RNG streams only if > 0
        self.current_device = _current_device_cpu
        self.memory_stats = lambda *args, **kwargs: {}
        self.get_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
        self.Stream, self.Event = _CPUStream, _CPUEvent
        self.current_stream = lambda device=None: _DEFAULT_STREAM
        self.stream = lambda stream=None: contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCPU(types.ModuleType):
    """The `torch` name inside modules that hard-code CUDA: factories build on the CPU, `torch.cuda` is
    `_CudaOnCPU`; everything else is torch itself. Only the named modules see it, never the model's ops."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCPU()
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _route_torch_to_cpu(modules) -> None:
    """Give each module the CPU view of `torch` (see `_TorchOnCPU`)."""
    view = _TorchOnCPU()
    for module in modules:
        module.torch = view


def apply_megatron_args_patches() -> None:
    """Without CUDA, megatron/training/arguments.py validate_args asks the GPU: it asserts
    `torch.cuda.get_device_capability()` >= 8 for --moe-grouped-gemm (its kernels; the local grouped experts,
    torch._grouped_mm, need none), and reads `get_device_arch_version()` (utils/common_utils.py) with
    tensor or context parallelism to require CUDA_DEVICE_MAX_CONNECTIONS=1 below Blackwell. Here the capability
    reads 8.0, the architecture 0, and that variable (meaningless without CUDA streams) is set. Idempotent."""
    import os

    import megatron.training.arguments as mlm_arguments

    if torch.cuda.is_available() or isinstance(mlm_arguments.torch, _TorchOnCPU):
        return
    _route_torch_to_cpu([mlm_arguments])
    mlm_arguments.torch.cuda.get_device_capability = lambda *args, **kwargs: (8, 0)
    mlm_arguments.get_device_arch_version = lambda: 0
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def _tensor_cuda_is_identity(tensor, *args, **kwargs):
    """`t.cuda()` (and so `module.cuda()`) on a machine without CUDA: the tensor stays where it is."""
    return tensor


_HELP_FORMAT = re.compile(r"%%|%\(\w+\)[a-zA-Z]|%")  # an escaped %, a format field, or a bare %


def escape_help_percents(parser) -> None:
    """megatron-core 0.19's help for --moe-paged-stash-buffer-size-factor-cuda (from the docstring of
    TransformerConfig.moe_paged_stash_buffer_size_factor_cuda) holds a bare `%`, so argparse's `--help`
    raises `ValueError: unsupported format character`; bare `%` signs become `%%`."""
    for action in parser._actions:
        if isinstance(action.help, str) and "%" in action.help:
            action.help = _HELP_FORMAT.sub(lambda m: m.group(0) if len(m.group(0)) > 1 else "%%", action.help)


def _skip_make_when_helpers_are_built(compile_dependencies):
    """megatron/training/initialize.py _compile_dependencies always runs `make` in megatron/core/datasets
    (datasets/utils.py compile_helpers), but the megatron-core wheel ships the compiled helpers_cpp and no
    Makefile, so Megatron-LM exits at start-up on every machine; with the module built, `make` is skipped."""

    def compile_if_needed(*args, **kwargs):
        import os

        from megatron.core import datasets
        makefile = os.path.join(os.path.dirname(datasets.__file__), "Makefile")
        if os.path.exists(makefile):
            return compile_dependencies(*args, **kwargs)
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError as err:
            raise RuntimeError("megatron-core's dataset helpers are neither built (helpers_cpp) nor buildable "
                               f"(no {makefile}): reinstall megatron-core ({err})") from None
        torch.distributed.barrier()

    compile_if_needed.__wrapped__ = compile_dependencies
    return compile_if_needed


def _fp8_false_means_off(init):
    """tensor_parallel/random.py CheckpointWithoutOutput.__init__ sets `self.fp8 = fp8 is not None`, so its
    default fp8=False turns the FP8 path on, whose forward calls Transformer Engine's FP8GlobalStateManager
    (transformer_layer.py builds it so for --recompute-modules layernorm): False is passed on as None."""

    def fixed(self, fp8=False):
        init(self, fp8=None if fp8 is False else fp8)

    fixed.__wrapped__ = init
    return fixed


_NO_TE_APPLIED = False


def apply_no_te_patches() -> None:
    """Where Transformer Engine is not installed (CPUs, or GPUs without it): megatron-core paths that reach it
    although no FP8 is asked for. Idempotent."""
    global _NO_TE_APPLIED
    import importlib.util

    if _NO_TE_APPLIED or importlib.util.find_spec("transformer_engine") is not None:
        return
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.CheckpointWithoutOutput.__init__ = _fp8_false_means_off(mcore_random.CheckpointWithoutOutput.__init__)
    _NO_TE_APPLIED = True


_MEGATRON_LM_APPLIED = False


def apply_megatron_lm_patches() -> None:
    """Let Megatron-LM's own training loop (megatron.training.pretrain) run the dsv3 model; idempotent.

    On any machine: the dataset-helper build without a Makefile (and `apply_no_te_patches`). Without CUDA,
    also `apply_cpu_patches()` and Megatron-LM's CUDA assumptions (its start-up assertion and device literals)."""
    global _MEGATRON_LM_APPLIED
    if _MEGATRON_LM_APPLIED:
        return
    apply_no_te_patches()
    apply_megatron_args_patches()
    import megatron.training.initialize as mlm_initialize

    mlm_initialize._compile_dependencies = _skip_make_when_helpers_are_built(mlm_initialize._compile_dependencies)
    if not torch.cuda.is_available():
        apply_cpu_patches()
        import megatron.core.rerun_state_machine as rerun_state_machine
        import megatron.training.checkpointing as mlm_checkpointing
        import megatron.training.training as mlm_training
        import megatron.training.utils.common_utils as mlm_common_utils

        # training.py pretrain asserts CUDA through initialize_megatron(allow_no_cuda=False), the only check
        # that flag controls.
        initialize_megatron = mlm_training.initialize_megatron
        mlm_training.initialize_megatron = lambda *args, **kwargs: initialize_megatron(
            *args, **{**kwargs, "allow_no_cuda": True})
        # device="cuda" and torch.cuda.* in training.py (start-time all-reduces, loss accumulators, eval
        # counters, data-iterator flags, memory reports), initialize.py (device count, set_device, MoE aux-loss
        # scale), checkpointing.py (iteration all-reduce, CUDA RNG state) and utils/common_utils.py (loss
        # and grad-norm reductions).
        _route_torch_to_cpu([mlm_training, mlm_initialize, mlm_checkpointing, mlm_common_utils, rerun_state_machine])
    _MEGATRON_LM_APPLIED = True


def apply_cpu_patches() -> None:
    """Make megatron-core's CUDA-assuming paths run on CPU. Idempotent; refuses to run when CUDA exists."""
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("apply_cpu_patches is for machines without CUDA")
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler
    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import layers as tp_layers
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.moe import token_dispatcher

    # torch.cuda.current_device() is used as a device literal in megatron-core, e.g.
    # models/common/embeddings/yarn_rotary_pos_embedding.py YarnRotaryEmbedding.__init__/get_emb,
    # transformer/moe/router.py TopKRouter.__init__ (expert_bias, local_tokens_per_expert buffers),
    # transformer/multi_token_prediction.py (MTP loss tracker), models/gpt/gpt_model.py (MTP labels),
    # tensor_parallel/layers.py (weight allocation), distributed/param_and_grad_buffer.py (grad buffers).
    torch.cuda.current_device = _current_device_cpu

    # transformer/moe/token_dispatcher.py MoEAlltoAllTokenDispatcher.__init__ creates torch.cuda.Stream() and
    # _maybe_dtoh_and_synchronize uses torch.cuda.current_stream / torch.cuda.stream / record_event().synchronize.
    torch.cuda.Stream = _CPUStream
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    # torch.cuda.synchronize() in pipeline_parallel/p2p_communication.py P2PCommunicator._communicate and
    # dist_checkpointing/strategies/filesystem_async.py (checkpoint writes).
    torch.cuda.synchronize = lambda device=None: None
    # models/common/language_module/language_module.py setup_embeddings_and_output_layer (weight.data.cuda()),
    # Megatron-LM's get_model (model_module.cuda(...)) and batch moves (batch[key].cuda(non_blocking=True)):
    # without CUDA these could only raise, so tensors stay on the CPU.
    torch.Tensor.cuda = _tensor_cuda_is_identity

    # transformer/moe/token_dispatcher.py MoEAlltoAllTokenDispatcher.token_dispatch/token_combine pass numpy
    # split sizes (from _maybe_dtoh_and_synchronize) to tensor_parallel/mappings.py all_to_all.
    token_dispatcher.all_to_all = _split_sizes_as_lists(token_dispatcher.all_to_all)

    # Literal device="cuda" tensors and torch.cuda calls: optimizer/optimizer.py (FP32Optimizer._scale, the
    # has_grad_norm_group flag, found-inf buffers), optimizer/clip_grads.py get_grad_norm_fp32 /
    # count_zeros_fp32 (norm and overflow buffers), utils.py local_multi_tensor_l2_norm (the norm they use
    # without Apex/TE) and pipeline_parallel/schedules.py forward_backward_* (total_num_tokens counters): those
    # modules see the CPU view of torch; the model's ops do not.
    # ... and optimizer/grad_scaler.py (the --fp16 loss scale and its factors).
    _route_torch_to_cpu([mcore_optimizer, clip_grads, schedules, mcore_utils, grad_scaler])
    # optimizer/optimizer.py Float16OptimizerWithFloat16Params.__init__ (--bf16/--fp16) accepts a parameter only
    # if param.type() is a torch.cuda type name: its construction (once) sees CPU tensors named so.
    # optimizer/distrib_optimizer.py DistributedOptimizer.__init__ (--use-distributed-optimizer) does the same.
    for cls in (mcore_optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer):
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    # clip_grad_by_total_norm_fp32 asserts each grad is a torch.cuda.FloatTensor: replaced outright.
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu

    # tensor_parallel/layers.py imports the CUDA extension fused_weight_gradient_mlp_cuda for
    # gradient_accumulation_fusion (weight gradients accumulated into FP32 main_grad inside the GEMM, as BF16
    # training on GPUs does) and refuses the option without it: a CPU stand-in with the same arithmetic.
    if not tp_layers._grad_accum_fusion_available:
        tp_layers.fused_weight_gradient_mlp_cuda = _FusedWgradAccumulationOnCPU
        tp_layers._grad_accum_fusion_available = True

    # tensor_parallel/random.py initialize_rng_tracker picks `CudaRNGStatesTracker` as the base tracker class;
    # model_parallel_cuda_manual_seed then calls its add(), which needs CUDA RNG states.
    mcore_random.CudaRNGStatesTracker = CPURNGStatesTracker
    # tensor_parallel/random.py _get_all_rng_states / _set_all_rng_states (activation recompute: checkpoint and
    # CheckpointWithoutOutput, used by --recompute-granularity) save and restore the CUDA generator's state
    # next to the CPU one and the tracker's; without CUDA there is no such state.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None
    _APPLIED = True
