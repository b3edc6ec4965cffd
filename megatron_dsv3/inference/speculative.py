"""Greedy MTP speculative decoding: the MTP module drafts the token after next, the main model verifies.

Position bookkeeping (n = tokens already in the main cache; t_n is the last emitted, not yet cached, token):
  draft   d = argmax MTP(h_{n-1}, emb(t_n))          -- MTP has its own latent cache of (h_i, t_{i+1}) pairs
  verify  main model over [t_n, d] at positions n, n+1 (one forward, with the cache)
          g0 = argmax logits(n): if g0 == d the draft is accepted and g1 = argmax logits(n+1) comes for free
          (2 tokens this step); otherwise g0 is emitted and position n+1 is dropped from the cache (1 token).
The emitted tokens are therefore always the main model's own greedy choices: the output equals plain
greedy decoding, only the number of main-model forwards changes.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from megatron_dsv3.inference.generate import GenerationOutput, InferenceEngine, as_batch


FALLBACK_WINDOW = 16  # drafts judged at a time


@torch.no_grad()
def speculative_generate(engine: InferenceEngine, prompt, max_new_tokens: int, *,
                         eos_id: Optional[int] = None, min_acceptance: float = 0.35,
                         draft_hook: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None) -> GenerationOutput:
    """Greedy generation of one prompt with MTP drafts; stats add acceptance_rate and tokens_per_main_step.

    When fewer than `min_acceptance` of the last 16 drafts were accepted, drafting stops and the rest is
    decoded plainly (a draft costs an MTP step and a wider verification; below that rate it does not pay).
    `draft_hook(position, draft)` may replace the MTP draft for sequence position `position` (tests use it to
    force accept/reject patterns); the output must not depend on it, only the step count does."""
    if not engine.mtp_layers:
        raise ValueError("--speculative: the model has no MTP module (num_nextn_predict_layers = 0)")
    ids = as_batch(prompt).to(engine.device)
    if ids.shape[0] != 1:
        raise ValueError("speculative decoding takes one prompt at a time (batch 1)")
    p = ids.shape[1]
    if p + max_new_tokens + 1 > engine.capacity:
        raise ValueError(f"max_new_tokens: prompt ({p}) + {max_new_tokens} + 1 draft exceeds the cache capacity "
                         f"{engine.capacity}")
    main, mtp = engine.new_cache(1), engine.new_cache(1, mtp=True)
    t0 = time.perf_counter()
    logits, hidden = engine.forward(ids, main)
    t_prefill = time.perf_counter() - t0
    main_steps = 1
    cur = logits[:, -1].argmax(-1)                     # t_P
    out = [int(cur)]
    # MTP over the prompt: (h_i, t_{i+1}) for i = 0..P-1, the last pair drafts t_{P+1}.
    pend_hidden, pend_next = hidden, torch.cat([ids[:, 1:], cur.view(1, 1)], dim=1)
    drafted = accepted = verified = 0
    recent: list[bool] = []
    fell_back_at = None

    def finished() -> bool:
        return len(out) >= max_new_tokens or (eos_id is not None and out[-1] == eos_id)

    t1 = time.perf_counter()
    while not finished() and fell_back_at is None:
        draft = engine.mtp_forward(pend_hidden, pend_next, mtp, last_only=True)[:, -1].argmax(-1)
        n = main.length
        if draft_hook is not None:
            draft = draft_hook(n + 1, draft).view(1).to(draft)
        logits, hidden = engine.forward(torch.stack([cur, draft], dim=1), main)
        main_steps += 1
        drafted += 1
        g = logits.argmax(-1)[0]                         # [2]: greedy choices at positions n, n+1
        hit = int(g[0]) == int(draft)
        if hit:
            accepted += 1
            new = [int(draft), int(g[1])]
            cur = g[1].view(1)
            pend_hidden, pend_next = hidden, torch.stack([draft, cur], dim=1)
        else:
            main.truncate(n + 1)
            new = [int(g[0])]
            cur = g[0].view(1)
            pend_hidden, pend_next = hidden[:1], cur.view(1, 1)
        for t in new:
            if not finished():
                out.append(t)
                verified += 1
        recent = (recent + [hit])[-FALLBACK_WINDOW:]
        if len(recent) == FALLBACK_WINDOW and sum(recent) < min_acceptance * FALLBACK_WINDOW:
            fell_back_at = len(out)
    while not finished():                              # plain greedy decoding from here
        logits, _ = engine.forward(cur.view(1, 1), main)
        main_steps += 1
        cur = logits[:, -1].argmax(-1)
        out.append(int(cur))
    t_decode = time.perf_counter() - t1
    n_new = len(out)
    stats = {
        "mode": "speculative",
        "prompt_tokens": p, "new_tokens": n_new, "batch": 1,
        "main_model_steps": main_steps,  # prefill + verification forwards + plain steps after a fall-back
        "tokens_per_main_step": n_new / main_steps,
        "verify_steps": drafted, "accepted_drafts": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "fell_back_to_plain_at": fell_back_at, "plain_steps": main_steps - 1 - drafted,
        "tokens_per_verify_step": verified / drafted if drafted else 0.0,
        "prefill_s": t_prefill, "decode_s": t_decode,
        "tokens_per_s": n_new / max(t_prefill + t_decode, 1e-9),
        "cache_bytes_per_token": main.bytes_per_token(),
        "mtp_cache_bytes_per_token": mtp.bytes_per_token(),
        "cache_values_per_token_per_layer": main.values_per_token_per_layer(),
        "standard_kv_bytes_per_token": engine.standard_kv_bytes_per_token(),
    }
    return GenerationOutput(torch.tensor([out], dtype=torch.long), stats)
