"""Prefill + token-by-token decoding of a dsv3 GPTModel with the absorbed MLA latent cache.

    engine = InferenceEngine(model, capacity=256)
    out = engine.generate(prompt_ids, max_new_tokens=32)                       # greedy
    out = engine.generate(prompt_ids, 32, greedy=False, temperature=0.8, top_k=50, top_p=0.95, seed=0)
    out.tokens, out.stats   # generated ids [batch, n]; tokens_per_s, cache_bytes_per_token, ...
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from megatron_dsv3.inference.latent_cache import CachedLayer, LatentCache
from megatron_dsv3.inference.plain_modules import (module_output, plain_embedding, plain_linear, plain_norm,
                                                    plain_norm_pair)


@dataclass
class GenerationOutput:
    tokens: torch.Tensor                    # [batch, generated] new token ids
    stats: dict = field(default_factory=dict)

    def as_list(self, row: int = 0) -> list[int]:
        return [int(t) for t in self.tokens[row]]


def inference_step(fn):
    """Run a model step under torch.inference_mode (less per-op bookkeeping than no_grad: a decode step is
    hundreds of small ops), entering it only when the caller is not already inside (a decoder calls its steps
    from within the mode; re-entering costs a few microseconds per step)."""
    @functools.wraps(fn)
    def step(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode():
            return fn(*args, **kwargs)
    return step


def decoding(fn):
    """A decoder run as an inference step that hands back its tokens as an ordinary tensor, free to modify in
    place outside the mode."""
    step = inference_step(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs) -> GenerationOutput:
        out = step(*args, **kwargs)
        out.tokens = out.tokens.clone()
        return out
    return run


def as_batch(prompt: Union[Sequence[int], torch.Tensor]) -> torch.Tensor:
    """A prompt (list of ids, 1-D or 2-D tensor of equal-length prompts) as a [batch, seq] long tensor."""
    ids = prompt if isinstance(prompt, torch.Tensor) else torch.tensor(list(prompt), dtype=torch.long)
    ids = ids.long()
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"prompt: expected a non-empty [seq] or [batch, seq] id list, got shape {tuple(ids.shape)}")
    return ids


def sample_next(logits: torch.Tensor, *, greedy: bool = True, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next ids [batch] from last-position logits [batch, vocab]: argmax, or temperature/top-k/top-p sampling."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
    logits = logits.float() / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs      # mass strictly above each candidate
        drop_sorted = before >= top_p                      # the top candidate is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class InferenceEngine:
    """Runs a (TP=1, PP=1) dsv3 GPTModel's own modules with the latent cache.

    `capacity` bounds prompt + generated length (default: the model's max_position_embeddings).
    """

    def __init__(self, model, capacity: Optional[int] = None):
        model = getattr(model, "module", model)
        if not (getattr(model, "pre_process", True) and getattr(model, "post_process", True)):
            raise ValueError("pipeline_model_parallel_size: the inference engine needs the whole model (PP=1)")
        self.model = model.eval()
        cfg = model.config
        self.config = cfg
        self.capacity = int(capacity or model.max_sequence_length)
        self.layers = [CachedLayer(layer, self.capacity) for layer in model.decoder.layers]
        mtp = getattr(model, "mtp", None)
        self.mtp_layers = [CachedLayer(m.mtp_model_layer, self.capacity) for m in mtp.layers] if mtp else []
        self._embedding = plain_embedding(model.embedding)
        self._final_norm = plain_norm(model.decoder.final_layernorm)
        self._output_layer = plain_linear(model.output_layer)
        self._tied_head = model.share_embeddings_and_output_weights
        self._scale_logits = getattr(model, "_scale_logits", None)
        if mtp:  # the first MTP module drafts
            first = mtp.layers[0]
            self._mtp_eh_proj = plain_linear(first.eh_proj)
            self._mtp_input_norms = plain_norm_pair(first.enorm, first.hnorm)   # cat([enorm(e), hnorm(h)])
            self._mtp_final_norm = plain_norm(first.final_layernorm)
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device

    # ----- caches -----------------------------------------------------------------------------------------
    def new_cache(self, batch: int = 1, mtp: bool = False) -> LatentCache:
        """An empty latent cache for the main decoder (or, with mtp=True, for the first MTP layer)."""
        layers = 1 if mtp else len(self.layers)
        if mtp and not self.mtp_layers:
            raise ValueError("num_nextn_predict_layers: the model has no MTP module")
        return LatentCache.allocate(layers, batch, self.capacity, self.config.kv_lora_rank,
                                    self.config.qk_pos_emb_head_dim, dtype=self.dtype, device=self.device)

    def standard_kv_bytes_per_token(self) -> int:
        """What a plain (non-latent) K/V cache would hold per token: all heads' keys and values, all layers."""
        c = self.config
        per_layer = c.num_attention_heads * (c.qk_head_dim + c.qk_pos_emb_head_dim + c.v_head_dim)
        return per_layer * len(self.layers) * torch.tensor([], dtype=self.dtype).element_size()

    # ----- forward pieces ----------------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        return self._embedding(ids, start)  # [s, b, hidden]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self._tied_head:
            logits = module_output(m.output_layer(hidden, weight=m.shared_embedding_or_output_weight()))
        else:
            logits = self._output_layer(hidden)
        if self._scale_logits is not None:
            logits = self._scale_logits(logits)
        logits = logits.transpose(0, 1)  # [b, s, vocab]
        return logits if logits.dtype == torch.float32 else logits.float()

    @inference_step
    def forward(self, ids: torch.Tensor, cache: LatentCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `ids` [b, s] at positions cache.length.. ; returns (logits [b, s, vocab], the decoder's final
        hidden states [s, b, hidden] after its final norm, which is what the MTP module takes), both inference
        tensors (read-only outside torch.inference_mode)."""
        start = cache.length
        h = self._embed(ids.to(self.device), start)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache, i, start)
        cache.length = start + ids.shape[1]
        h = self._final_norm(h)
        return self._logits(h), h

    @inference_step
    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: LatentCache,
                    last_only: bool = False, with_hidden: bool = False):
        """First MTP module at positions cache.length..: position i takes the main model's hidden h_i [s, b, H]
        and the token t_{i+1} (next_ids [b, s]); returns logits [b, s, vocab] for t_{i+2} (with `last_only`,
        [b, 1, vocab] for the last position: all a draft needs, so the others only fill the cache). With
        `with_hidden`, also the module's output after its final norm (what megatron-core hands the next MTP
        depth), for chained drafts."""
        start = cache.length
        x = self._mtp_eh_proj(self._mtp_input_norms(self._embed(next_ids.to(self.device), start + 1), hidden))
        x = self._mtp_final_norm(self.mtp_layers[0](x, cache, 0, start, last_only=last_only))
        cache.length = start + next_ids.shape[1]
        return (self._logits(x), x) if with_hidden else self._logits(x)

    # ----- generation --------------------------------------------------------------------------------------
    @decoding
    def generate(self, prompt, max_new_tokens: int, *, greedy: bool = True, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None,
                 eos_id: Optional[int] = None) -> GenerationOutput:
        """Prefill the prompt, then decode one token per main-model step. With eos_id, a row stops growing
        after its first eos (the tensor is cut after the step where every row has stopped)."""
        ids = as_batch(prompt).to(self.device)
        b, p = ids.shape
        if p + max_new_tokens > self.capacity:
            raise ValueError(f"max_new_tokens: prompt ({p}) + {max_new_tokens} exceeds the cache capacity "
                             f"{self.capacity}")
        gen = None
        if not greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(0 if seed is None else int(seed))
        cache = self.new_cache(b)
        t0 = time.perf_counter()
        logits, _ = self.forward(ids, cache)
        t_prefill = time.perf_counter() - t0
        steps, out = 0, []
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        last = logits[:, -1]
        t1 = time.perf_counter()
        for _ in range(max_new_tokens):
            nxt = sample_next(last, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done |= nxt == eos_id
            out.append(nxt)
            if len(out) == max_new_tokens or (eos_id is not None and bool(done.all())):
                break
            logits, _ = self.forward(nxt.unsqueeze(1), cache)
            steps += 1
            last = logits[:, -1]
        t_decode = time.perf_counter() - t1
        tokens = torch.stack(out, dim=1) if out else torch.zeros(b, 0, dtype=torch.long)
        n = tokens.shape[1]
        stats = {
            "mode": "greedy" if greedy else "sample",
            "prompt_tokens": p, "new_tokens": n, "batch": b,
            "main_model_steps": steps + 1,  # prefill + decode steps
            "tokens_per_main_step": n / (steps + 1) if n else 0.0,
            "prefill_s": t_prefill, "decode_s": t_decode,
            "tokens_per_s": b * n / max(t_prefill + t_decode, 1e-9),
            "cache_bytes_per_token": cache.bytes_per_token(),
            "cache_values_per_token_per_layer": cache.values_per_token_per_layer(),
            "standard_kv_bytes_per_token": self.standard_kv_bytes_per_token(),
        }
        return GenerationOutput(tokens.cpu(), stats)
