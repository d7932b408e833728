"""The sampler's attention for several tokens a row after earlier ones: an observation's prefill, a prompt-lookup
draft of one row or of the greedy tail's several rows.

transformers' SDPA path gives a [b, 1, q, L] mask with grouped-query heads to torch's kernel only after
repeat_kv has copied every key and value head G times (G query heads a key head), and every row attends
over the longest row's L. Here each row attends alone, over its own keys only, and the G query heads of a
key head are packed as G x q queries of that head (no copy): on SmolLM2 (9 query, 3 key heads), 8 rows of
16 tokens over 3,000-token contexts, one layer's attention took 96 ms before and 19 ms after (Xeon @ 2.8 GHz,
1 thread, random tensors).

Rows of several lengths (the tail's drafts, the contexts of several episodes prefilled together) come packed:
one sequence of all their tokens, rows_q[r] of them row r's, each with its own row's position, so the model's
matrix products run over no pad tokens; here each row's queries attend over that row's keys.

A decode step (one token a row) attends row by row too when its rows' lengths differ by more than ROW_KEYS keys a
row on average: batched, every row reads keys up to the longest row's, masked. On SmolLM2, 32 rows, one layer (AMX Xeon,
1 thread, random tensors): rows of 1,000 keys 5.4 ms batched, 7.3 row by row (each row's call costs ~25 us, ~125 keys'
worth); one row of 1,000 and 31 of 500 6.5 ms against 2.8. Rows of equal length, like every other call (no mask, a
float mask), go to transformers' SDPA unchanged, so a first prefill and PPO's right-padded forward compute what they
did. load_policy installs it where a model runs SDPA (`use`, which also marks the model `packs_rows`); a model on eager
or flash attention keeps its own, and the sampler pads its rows instead.
"""
import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_rows"
ROW_KEYS = 160   # a decode step goes row by row when the batch's padded keys exceed this many a row (see above)


def rows_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, rows_q=None, **kwargs):
    """query [b, H, q, D], key/value [b, KH, L, D], attention_mask [b, 1, q, L] bool -> ([b, q, H, D], None).
    rows_q (packed rows): query [1, H, Q, D] holds row r's rows_q[r] queries after the rows before it, key/value's
    row r its keys, attention_mask [1, 1, Q, L] each query's own row's keys."""
    b, H, q, D = query.shape
    m, G = attention_mask, H // key.shape[1]
    special = dropout or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias"))
    if rows_q is not None and special:                      # SDPA's own code would read the packed rows as one
        raise ValueError("packed rows: dropout, soft-capping, attention sinks and position biases are not supported")
    rows = m is not None and m.dtype == torch.bool and m.dim() == 4 and m.shape[1] == 1   # one bool mask for all heads
    if rows and q == 1 and rows_q is None:                  # decoding: row by row if the rows' padding outweighs the calls
        n = m.shape[-1] - m[:, 0, 0].flip(-1).int().argmax(-1)                        # [b] keys up to each row's last seen
        rows = int(b * m.shape[-1] - n.sum()) > ROW_KEYS * b
    if rows_q is None and not rows or special:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    parts = [(0, e - n, n, r) for r, (n, e) in enumerate(zip(rows_q, itertools.accumulate(rows_q))) if n] if rows_q else \
        [(r, 0, q, r) for r in range(b)]
    out = []
    for row, a, n, kr in parts:   # n queries of query row `row` from `a`, over key row kr; head h = key head h // G (repeat_kv's)
        mr = m[row:row + 1, :, a:a + n]                     # [1, 1, n, L]
        L = mr.shape[-1] - int(mr[0, 0, -1].flip(0).int().argmax())   # keys past the last one its last query sees: unread
        mr = None if bool(mr[..., :L].all()) else mr[..., :L].repeat(1, 1, G, 1)   # all seen (decoding): SDPA's unmasked path
        out.append(F.scaled_dot_product_attention(query[row:row + 1, :, a:a + n].reshape(1, H // G, G * n, D), key[kr:kr + 1, :, :L],
                                                  value[kr:kr + 1, :, :L], attn_mask=mr, scale=scaling).reshape(1, H, n, D))
    return torch.cat(out, 2 if rows_q else 0).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, rows_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)     # masks made exactly as for SDPA


def use(model):
    """Runs `model`'s attention through rows_attention where it ran transformers' SDPA; the sampler then feeds rows of
    several lengths packed (model.packs_rows), where it pads them for any other attention."""
    if model.config._attn_implementation == "sdpa":
        model.config._attn_implementation, model.packs_rows = NAME, True
