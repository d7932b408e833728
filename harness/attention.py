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

On CPU such a model's sampler keeps each row's keys and values in tensors of its own (RowCache; on a GPU, where each
row's call in each layer would cost kernel launches, not measured here, the dense rollout._Slots as before): a row's
memory follows its own length, where rollout._Slots holds every row at the longest row's capacity. Its decode steps then
always go row by row, each row over exactly its own keys, with no mask. SmolLM2's evaluation of 120 tasks at 32 rows
(fp32, 1 thread, the AMX Xeon): peak RSS 2.55 GB against 4.43, 3 % slower, every trajectory the same.
"""
import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_rows"
ROW_KEYS = 160   # a decode step goes row by row when the batch's padded keys exceed this many a row (see above)
ROW_ROOM = 64    # RowCache: a row grows by max(this, 1/8 of it) tokens when it runs out of room


def rows_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, rows_q=None, **kwargs):
    """query [b, H, q, D], key/value [b, KH, L, D], attention_mask [b, 1, q, L] bool -> ([b, q, H, D], None).
    rows_q (packed rows): query [1, H, Q, D] holds row r's rows_q[r] queries after the rows before it, key/value's
    row r its keys, attention_mask [1, 1, Q, L] each query's own row's keys."""
    b, H, q, D = query.shape
    m, listed = attention_mask, isinstance(key, list)      # listed: each row's keys in a tensor of its own (RowCache)
    G = H // (key[0] if listed else key).shape[1]
    special = dropout or any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias"))
    if (rows_q is not None or listed) and special:          # SDPA's own code would read the packed rows as one
        raise ValueError("packed rows: dropout, soft-capping, attention sinks and position biases are not supported")
    rows = m is not None and m.dtype == torch.bool and m.dim() == 4 and m.shape[1] == 1   # one bool mask for all heads
    if listed and q == 1 and rows_q is None and kwargs.get("sliding_window") is None:   # decoding: each row sees all its keys
        return torch.cat([F.scaled_dot_product_attention(query[r:r + 1].reshape(1, H // G, G, D), key[r], value[r], scale=scaling)
                          for r in range(b)]).view(b, H, 1, D).transpose(1, 2), None
    if listed and m is None:                                # one row, no mask: its queries are its last q keys'
        m, rows = torch.ones(b, 1, q, key[0].shape[2], dtype=torch.bool, device=query.device).tril_(key[0].shape[2] - q), True
    if listed and not rows:
        raise ValueError("a cache of rows needs a boolean mask over each row's keys")
    if rows and q == 1 and rows_q is None and not listed:   # decoding: row by row if the rows' padding outweighs the calls
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
        k, v = (key[kr], value[kr]) if listed else (key[kr:kr + 1], value[kr:kr + 1])
        out.append(F.scaled_dot_product_attention(query[row:row + 1, :, a:a + n].reshape(1, H // G, G * n, D), k[:, :, :L],
                                                  v[:, :, :L], attn_mask=mr, scale=scaling).reshape(1, H, n, D))
    return torch.cat(out, 2 if rows_q else 0).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, rows_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)     # masks made exactly as for SDPA


def use(model):
    """Runs `model`'s attention through rows_attention where it ran transformers' SDPA; the sampler then feeds rows of
    several lengths packed (model.packs_rows), where it pads them for any other attention, and on CPU keeps each row's
    keys and values in tensors of its own (model.kv_cache = RowCache). model.window: a sliding window's (width, mixed with full
    layers), for the sampler's masks (transformers' count a window back from the longest row's end, not each row's)."""
    cfg = model.config.get_text_config()
    types, w = set(getattr(cfg, "layer_types", None) or []), getattr(cfg, "sliding_window", None)
    if w and ("sliding_attention" in types or not types):   # (window, some layers attend fully) for the sampler's masks
        model.window = (w, "full_attention" in types)
    if model.config._attn_implementation == "sdpa":
        model.config._attn_implementation, model.packs_rows = NAME, True
        if next(model.parameters()).device.type == "cpu":   # on a GPU a call a row and layer costs launches: the dense cache
            model.kv_cache = RowCache


class RowCache(Cache):
    """The sampler's keys and values (rollout._sample_turns) where the model's attention is rows_attention: each slot's
    in tensors of its own, per layer [1, KH, capacity, D], so a row's memory follows its own length. (rollout._Slots, one
    [slots, KH, capacity, D] tensor a layer for any attention, holds every row at the longest row's capacity: three
    quarters of it padding on an evaluation of SmolLM2 at 32 rows.) The same interface as _Slots: n[s] tokens held in
    slot s, `at` the fed tokens' (rows, slots, positions) set by rollout._forward, then grow(); a row grows by ROW_ROOM
    tokens or an eighth when a feed needs more room (up to max_context); an ended episode's slot frees its tensors at the
    next compact()."""

    def __init__(self, policy, S, max_context):
        self.packs = getattr(policy.model, "packs_rows", False)   # rows of several lengths fed packed (else padded)
        self.S, self.n, self.cap, self.limit, self.at, self.L, self.past = S, [0] * S, [0] * S, max_context or 1 << 62, None, 0, 0
        self.writes = []
        super().__init__(layers=[_RowLayer(self) for _ in range(policy.model.config.get_text_config().num_hidden_layers)])

    def grow(self, need, hi):
        """Room for `need` - L more tokens after each fed row's last (a turn's tokens to come): each fed row's
        capacity; and where each one's fed tokens go: (slot, batch row, first and end query index, first position)."""
        slots, pos = self.at[2:]
        room, self.writes, self.len = min(need - self.L, ROW_ROOM), [], {}
        for bi, (ss, ps) in enumerate(zip(slots.tolist(), pos.tolist())):
            for s, grp in itertools.groupby(range(len(ss)), key=ss.__getitem__):
                grp = list(grp)
                a, e = grp[0], grp[-1] + 1
                self.writes.append((s, bi, a, e, ps[a]))
                self.len[s] = ps[a] + e - a                 # its keys up to this feed's last
                if self.len[s] > self.cap[s]:
                    self.cap[s] = max(self.len[s] + room, min(self.cap[s] + max(ROW_ROOM, self.cap[s] // 8), self.limit))

    def compact(self, slot):
        """Live slots back to 0..m-1 (each above moves to a free one below: its tensors, no copy); free slots' freed."""
        m, used = len(slot), set(slot.values())
        for i, s in zip([i for i in slot if slot[i] >= m], sorted(set(range(m)) - used)):
            a = slot[i]
            for layer in self.layers:
                layer.k[s], layer.v[s], layer.k[a], layer.v[a] = layer.k[a], layer.v[a], None, None
            self.n[s], self.cap[s], self.n[a], self.cap[a], slot[i] = self.n[a], self.cap[a], 0, 0, s
        for s in set(range(self.S)) - set(slot.values()):
            if self.cap[s]:
                for layer in self.layers:
                    layer.k[s] = layer.v[s] = None
                self.n[s] = self.cap[s] = 0


class _RowLayer(DynamicLayer):
    """One layer of RowCache: each fed row's keys and values written at its positions -> the rows' tensors, lists."""

    def __init__(self, kv):
        super().__init__()
        self.kv, self.k, self.v, self.is_initialized = kv, [None] * kv.S, [None] * kv.S, True

    def update(self, k, v, *args, **kwargs):
        kv = self.kv
        for s, bi, a, e, p in kv.writes:
            if self.k[s] is None or self.k[s].shape[2] < kv.cap[s]:   # zeros: a masked position must not hold a NaN
                bk = k.new_zeros(1, k.shape[1], kv.cap[s], k.shape[3]); bv = torch.zeros_like(bk, dtype=v.dtype)
                if self.k[s] is not None:
                    bk[:, :, :p], bv[:, :, :p] = self.k[s][:, :, :p], self.v[s][:, :, :p]
                self.k[s], self.v[s] = bk, bv
            self.k[s][0, :, p:p + e - a], self.v[s][0, :, p:p + e - a] = k[bi, :, a:e], v[bi, :, a:e]
        rows = range(kv.at[0], kv.at[1])                    # each fed row's keys so far (views); a row not fed: None
        return [self.k[s][:, :, :kv.len[s]] if s in kv.len else None for s in rows], \
            [self.v[s][:, :, :kv.len[s]] if s in kv.len else None for s in rows]

    def get_seq_length(self):
        return self.kv.past
