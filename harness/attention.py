"""The sampler's attention for several tokens a row after earlier ones: an observation's prefill, a prompt-lookup
draft of one row or of the greedy tail's several rows.

transformers' SDPA path gives a [b, 1, q, L] mask with grouped-query heads to torch's kernel only after
repeat_kv has copied every key and value head G times (G query heads a key head), and every row attends
over the longest row's L. Here each row attends alone, over its own keys only, and the G query heads of a
key head are packed as G x q queries of that head (no copy): on SmolLM2 (9 query, 3 key heads), 8 rows of
16 tokens over 3,000-token contexts, one layer's attention took 96 ms before and 19 ms after (Xeon @ 2.8 GHz,
1 thread, random tensors).

Every other call (one token a row, no mask, a float mask) goes to transformers' SDPA unchanged,
so decoding, a first prefill and PPO's right-padded forward compute what they did. load_policy installs it where a model runs
SDPA (`use`); a model on eager or flash attention keeps its own.
"""
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_rows"


def rows_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [b, H, q, D], key/value [b, KH, L, D], attention_mask [b, 1, q, L] bool -> ([b, q, H, D], None)."""
    b, H, q, D = query.shape
    m, G = attention_mask, H // key.shape[1]
    if q == 1 or m is None or m.dtype != torch.bool or m.dim() != 4 or m.shape[1] != 1 or dropout or \
            any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias")):   # what SDPA's own code handles
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    last = m[:, 0, -1]                                        # [b, L]: what row r's last query sees
    lengths = (last.shape[-1] - last.flip(-1).int().argmax(-1)).tolist()   # keys past the last one it sees: unread
    out = [F.scaled_dot_product_attention(query[r:r + 1].reshape(1, H // G, G * q, D), key[r:r + 1, :, :n],
                                          value[r:r + 1, :, :n], attn_mask=m[r:r + 1, :, :, :n].repeat(1, 1, G, 1),
                                          scale=scaling).reshape(1, H, q, D)   # head h = key head h // G, as repeat_kv
           for r, n in enumerate(lengths)]
    return torch.cat(out).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, rows_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)     # masks made exactly as for SDPA


def use(model):
    """Runs `model`'s attention through rows_attention where it ran transformers' SDPA."""
    if model.config._attn_implementation == "sdpa":
        model.config._attn_implementation = NAME
