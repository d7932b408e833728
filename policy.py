"""The policy pi_theta of StepTool (paper Sec. 4.2): any HF causal LM + hand-written LoRA + a value head.

    load_policy("Qwen/Qwen2-7B" | "/local/dir" | "file.gguf" | "smollm2" | "<our checkpoint dir>" | "tiny") -> Policy

- LoRA (Hu et al. 2021): W x + (alpha / r) * B A x on the attention and MLP projections; B starts
  at 0, so a fresh adapter is an exact no-op. Only LoRA and value-head weights train by default.
- The reference policy pi_ref of the KL penalty is the same weights with the trainable LoRA switched
  off (no second copy of the model; frozen adapters stay on); with --full-finetune it is a frozen copy.
- The value head V(s) is one linear layer on the last hidden state (as trl's ValueHead).
- Logits are computed only where a log-prob is needed (the action tokens), never over the whole
  sequence, and as the model's own forward computes them (soft-capping, logit scaling: `logits`,
  checked against the model at load); the log-softmax over the vocabulary runs over chunks of action
  tokens, recomputed in backward when there are several, so memory does not grow by a [tokens,
  vocabulary] tensor.
- One policy whatever the dtype: sampling computes what PPO's forward computes. fp32 weights sample
  through W + B A merged once per batch of rollouts; bf16/fp16 weights are never merged (most of a
  small B A would round away in bf16) and sample through the same two-path sum as the update.
  Likewise freeze_reference (the SFT start becoming pi_ref) keeps a bf16 model's adapter exactly, as a
  frozen adapter under the trainable one.
- `generate` samples a batch of next turns with the KV cache (left padding), temperature / top-p,
  one uniform draw per token from each episode's own generator, so an episode's randomness
  depends on (seed, iteration, episode) only, not on what else is in the batch. Given each
  episode's cache from its previous turn, a turn computes only its new tokens.
- `encode_*` turn a dialogue into token ids turn by turn; rollout.py builds episodes with them. The
  chat template's end of turn and its role for tool responses come from chat.py, detected at load;
  every observation is checked in its tokens.

    python policy.py --save-tiny DIR     # write the tiny model + tokenizer with save_pretrained

Departures from the original code:
1. The original wraps peft + trl's AutoModelForCausalLMWithValueHead; both are replaced by ~60
   lines here so a reader sees exactly which weights train.
2. `tiny` is a random ~1.6 M-parameter Qwen2 with a BPE tokenizer trained on the embedded
   benchmark's train split: the CPU stand-in for Qwen2-7B (same code path; no download).
"""
import argparse
import contextlib
import copy
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

import chat

HERE = os.path.dirname(os.path.abspath(__file__))
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the log-softmax over the vocabulary runs over chunks of action tokens of at most this many logits
# (2^26 fp32 = 256 MB per [n, V] tensor: 441 tokens of a 152k vocabulary)
LOGIT_CHUNK_ELEMENTS = 1 << 26
TINY = dict(hidden_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=512, max_position_embeddings=2048, tie_word_embeddings=True)


# ---- LoRA -----------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """y = W x + (alpha / r) (B A dropout(x) + B0 A0 x); W frozen, A ~ Kaiming, B = 0 (an exact no-op at start).

    A and B are fp32 whatever W's dtype: Adam updates of bf16 weights lose most of their bits.
    A0, B0 (fp32 buffers, rank 0 unless set): adapters frozen under the trainable one, the SFT start
    that became pi_ref on a low-precision base (Policy.freeze_reference): added to W in bf16, most of a
    small B A would round away, so pi_ref would not be the SFT policy."""

    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / r, True
        dev = base.weight.device
        self.A = nn.Parameter(torch.empty(r, base.in_features, dtype=torch.float32, device=dev))
        self.B = nn.Parameter(torch.zeros(base.out_features, r, dtype=torch.float32, device=dev))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.register_buffer("A0", torch.zeros(0, base.in_features, dtype=torch.float32, device=dev))
        self.register_buffer("B0", torch.zeros(base.out_features, 0, dtype=torch.float32, device=dev))
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    merged = None   # W + (alpha / r) (B A + B0 A0) while an fp32 policy samples (Policy.merged_lora)

    def forward(self, x):
        if self.merged is not None:
            return F.linear(x, self.merged, self.base.bias)
        y = self.base(x)
        if not self.A0.numel():                                               # no frozen adapter
            if not self.enabled:
                return y
            return y + ((self.drop(x).to(self.A.dtype) @ self.A.T @ self.B.T) * self.scale).to(y.dtype)
        d = x.to(self.A0.dtype) @ self.A0.T @ self.B0.T                       # pi_ref's part, never dropped out
        if self.enabled:
            d = d + self.drop(x).to(self.A.dtype) @ self.A.T @ self.B.T
        return y + (d * self.scale).to(y.dtype)

    def delta(self):
        """(alpha / r) (B A + B0 A0): what the adapters add to W, in fp32."""
        ba = self.B @ self.A
        return self.scale * (ba + self.B0 @ self.A0 if self.A0.numel() else ba)

    def freeze(self):
        """The trainable adapter joins the frozen ones (exactly: B0 A0 + B A is the rank-stacked product)
        and restarts at B = 0."""
        if bool(self.B.any()):
            self.A0, self.B0 = torch.cat([self.A0, self.A.detach()]), torch.cat([self.B0, self.B.detach()], 1)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5)); self.B.zero_()


def inject_lora(model, r=8, alpha=16, dropout=0.0, targets=LORA_TARGETS):
    """Wrap every nn.Linear whose name ends in one of `targets`; returns how many were wrapped.
    No match is an error that names the model's linear modules: a LoRA on nothing trains nothing."""
    hits = [(n, m) for n, m in model.named_modules() if n.split(".")[-1] in targets and isinstance(m, nn.Linear)]
    if not hits:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA targets {', '.join(targets)} match no linear module of this model; "
                         f"its linear modules are: {', '.join(names) or 'none'} (pass some as --lora-targets)")
    for name, lin in hits:
        parent, child = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model, name.rsplit(".", 1)[-1]
        setattr(parent, child, LoRALinear(lin, r, alpha, dropout))
    return len(hits)


# ---- the decode cache ---------------------------------------------------------------------
class _TurnBuffer(DynamicLayer):
    """One layer's keys and values for a turn: a buffer with room for every new token, filled up to n
    (transformers' DynamicCache concatenates, copying the whole cache for every sampled token)."""

    def __init__(self, bk, bv, n):  # bk, bv: [B, H, capacity, D]
        super().__init__()
        self.bk, self.bv, self.n, self.is_initialized = bk, bv, n, True
        self.dtype, self.device = bk.dtype, bk.device
        self.keys, self.values = bk[:, :, :n], bv[:, :, :n]

    def update(self, k, v, *args, **kwargs):
        q = k.shape[2]
        self.bk[:, :, self.n:self.n + q], self.bv[:, :, self.n:self.n + q] = k, v
        self.n += q
        self.keys, self.values = self.bk[:, :, :self.n], self.bv[:, :, :self.n]
        return self.keys, self.values

    def get_seq_length(self):
        return self.n

    def batch_select_indices(self, idx):
        self.bk, self.bv = self.bk[idx], self.bv[idx]
        self.keys, self.values = self.bk[:, :, :self.n], self.bv[:, :, :self.n]


# ---- the tiny model -------------------------------------------------------------------------
def build_tiny_tokenizer(vocab_size=2048):
    """Byte-level BPE trained on the embedded benchmark's train split (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    import env
    tasks = env.load_tasks(os.path.join(HERE, "data", "bench_train.json"))
    def texts():
        for t in tasks:
            yield "\n".join(m["content"] for m in env.initial_messages(t))
            for s in t.expert:
                yield env.format_action(s["thought"], s["name"], s["arguments"])
                yield json.dumps({"error": "", "response": {"status": 404, "message": "Not found."}})
    tk = Tokenizer(models.BPE())
    # words ([A-Za-z0-9_]+) never carry a space or punctuation, so a name (forecast_for_skycast,
    # Velmora) is the same tokens in the prompt, in an action and in an observation: easy to copy
    word = Regex(r"[A-Za-z0-9_]+|[^A-Za-z0-9_]+")
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(word, "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=chat.CHAT_TEMPLATE)


def build_tiny(seed=0, tok=None, **overrides):
    """A random Qwen2 (TINY, with config overrides) and its tokenizer (trained here unless `tok` is given)."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    tok = tok or build_tiny_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **{**TINY, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model, tok


# ---- the policy -----------------------------------------------------------------------------
class Policy(nn.Module):
    """pi_theta (LM + LoRA) and V (value head): one nn.Module, so DDP/FSDP wrap it in one place.

    source: where the base weights are on disk (hub id, folder or .gguf file), or "tiny"; `base_path`
    is None while no copy of the current base is on disk (a random model, or one changed by
    freeze_reference): then the next save writes it, once. `base_owned`: the base is a run folder's
    own `base/` (loaded from one of our checkpoints): a save into another run writes its own copy,
    so that no run depends on another's folder."""

    def __init__(self, model, tok, source, lora=None, full_finetune=False, compute_dtype=None):
        super().__init__()
        self.model, self.tok, self.source, self.lora_cfg = model, tok, source, lora
        self.full_finetune = full_finetune
        self.base_path = None if source == "tiny" else os.path.abspath(source) if os.path.exists(source) else source
        self.base_owned = False
        # full fine-tuning in half precision keeps fp32 master weights and computes in half precision
        # under autocast: Adam steps of ~1e-5 relative vanish in bf16's 8-bit mantissa. pi_ref is a
        # frozen copy of the same fp32 weights under the same autocast, so pi_theta = pi_ref exactly
        # at the start (a bf16 copy would compute a bf16 residual stream: off by ~1e-3 per token).
        self.compute_dtype = compute_dtype or next(model.parameters()).dtype
        if full_finetune and self.compute_dtype == torch.float16:
            raise ValueError("full fine-tuning in float16 needs a loss scaler, which is not here: use bfloat16")
        if full_finetune and self.compute_dtype != torch.float32:
            model.float()
        self.ref_model = copy.deepcopy(model).requires_grad_(False).eval() if full_finetune else None
        self.v_head = nn.Linear(model.config.hidden_size, 1, device=model.device)  # fp32, as LoRA
        nn.init.zeros_(self.v_head.bias); nn.init.normal_(self.v_head.weight, std=1 / (model.config.hidden_size + 1))
        self.eot_id, self.eot = chat.end_of_turn(tok)
        # a turn ends at the template's end of turn or at any EOS the tokenizer or generation_config names
        # (Qwen2-Instruct: <|im_end|> and <|endoftext|>)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [tok.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])]
        self.stop_ids = sorted({self.eot_id, *[i for i in eos if i is not None]})
        self.obs_role = chat.observation_role(tok)  # the chat template's role for tool responses
        # where sampling spends its time (steptool.py logs each iteration's share): seconds and tokens
        self.gen_stats = {"prefill_s": 0.0, "prefill_tokens": 0, "decode_s": 0.0, "decode_tokens": 0}

    @property
    def device(self):
        return self.v_head.weight.device

    def autocast(self):
        """Half-precision compute over fp32 master weights (full fine-tuning of a bf16 model), else a no-op."""
        if self.compute_dtype == torch.float32 or not self.full_finetune:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def train_without_dropout(self):
        """The PPO update's mode: every module in eval mode, so no dropout anywhere and pi_theta equals
        the pi_old that prepare() read until the first optimizer step (bit for bit when the update's
        mini-batches are prepare's, as when one optimizer step takes the whole batch; else up to float
        rounding, ~1e-15); only the decoder layers that gradient checkpointing runs in are flagged
        training (it checks that flag), not their children."""
        from transformers.modeling_layers import GradientCheckpointingLayer
        self.eval()
        for m in self.modules():
            if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
                m.training = True  # this layer alone: its attention and dropout stay in eval
        return self

    def lora_modules(self):
        return [m for m in self.model.modules() if isinstance(m, LoRALinear)]

    @contextlib.contextmanager
    def reference(self):
        """pi_ref: LoRA off (same weights, no copy), or the frozen copy when fully fine-tuning."""
        if self.ref_model is not None:
            old, self.model = self.model, self.ref_model
            try:
                yield
            finally:
                self.model = old
            return
        mods = self.lora_modules()
        for m in mods:
            m.enabled = False
        try:
            yield
        finally:
            for m in mods:
                m.enabled = True

    def forward(self, ids, mask, act_idx, act_tok, v_idx, entropy=False):
        """Log-probs of the action tokens, values at the value positions (and entropies).

        ids, mask: [B, T] (any padding side; positions come from the mask)
        act_idx: ([N], [N]) (row, position) of each action token; act_tok: [N] its id
        v_idx:   ([M], [M]) (row, position) where V is read (the last token of a state)
        -> logp [N], values [M], ent [N] or None
        """
        # Right padding needs no padding mask: under causal attention a real token never sees the
        # pads after it. Without a mask (and with plain 0..T-1 positions, which transformers does not
        # mistake for packed sequences), attention takes its causal kernel, which skips the masked
        # half of the work; an explicit mask makes it compute every pair.
        if bool((mask[:, 1:] <= mask[:, :-1]).all()):                         # right padded (or none)
            pos, attn = torch.arange(ids.shape[1], device=ids.device).expand_as(ids), None
        else:
            pos, attn = (mask.long().cumsum(-1) - 1).clamp(min=0), mask       # [B, T]
        b, t = act_idx
        with self.autocast():
            h = self.model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
            h_act = h[b, t - 1]                                                # [N, H]: token t is predicted at t-1
            # the vocabulary-wide part in chunks of action tokens; while training with more than one chunk,
            # each is recomputed in backward (checkpoint), so memory holds one chunk's [n, V] logits, not
            # all N's (one chunk is kept as it is: recomputing it would save nothing)
            n = max(1, LOGIT_CHUNK_ELEMENTS // self.model.get_output_embeddings().weight.shape[0])
            grad = torch.is_grad_enabled() and len(act_tok) > n
            parts = [checkpoint(self._token_logp, h_act[i:i + n], act_tok[i:i + n], entropy, use_reentrant=False)
                     if grad else self._token_logp(h_act[i:i + n], act_tok[i:i + n], entropy)
                     for i in range(0, len(act_tok), n)]
        logp = torch.cat([p[0] for p in parts]) if parts else h.new_zeros(0, dtype=torch.float32)   # [N]
        ent = (torch.cat([p[1] for p in parts]) if parts else logp.clone()) if entropy else None     # [N]
        values = self.v_head(h[v_idx].float()).squeeze(-1)                    # [M]
        return logp, values, ent

    def logits(self, h):
        """[n, H] last hidden states -> [n, V] fp32 logits, as the model's own forward makes them after its
        last hidden state: the LM head, then Cohere's logit_scale, Granite's (and MiniCPM3's) logits_scaling,
        Gemma 2/3's final soft-capping, in the model's dtype as it computes them. load_policy checks this
        against the model's own forward (check_logits): a model doing anything else is refused."""
        z = self.model.get_output_embeddings()(h)
        cfg = self.model.config.get_text_config()
        if getattr(self.model, "logit_scale", None) is not None:             # Cohere: logits * logit_scale
            z = z * self.model.logit_scale
        if getattr(cfg, "logits_scaling", None):                              # Granite: logits / logits_scaling
            z = z / cfg.logits_scaling
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:                                                               # Gemma 2/3: cap tanh(logits / cap)
            z = torch.tanh(z / cap) * cap
        return z.float()

    def _token_logp(self, h, tok, entropy):
        """One chunk: h [n, H], tok [n] -> (log pi(tok) [n], entropy [n] or None)."""
        logp_all = F.log_softmax(self.logits(h), -1)                         # [n, V]
        logp = logp_all.gather(-1, tok[:, None]).squeeze(-1)                  # [n]
        return logp, (-(logp_all.exp() * logp_all).sum(-1) if entropy else None)

    @torch.no_grad()
    def check_logits(self, n=8):
        """Policy.logits must give the model's own logits: compared on n token ids, a clear error if not
        (a model whose forward does something after its last hidden state that logits() does not know
        would make PPO's log-probs differ from the sampler's)."""
        ids = (torch.arange(n, device=self.device) * 7919 % self.model.config.get_text_config().vocab_size)[None]
        with self.autocast():
            own = self.model(input_ids=ids).logits[0].float()
            ours = self.logits(self.model.base_model(input_ids=ids).last_hidden_state[0])
        gap = (F.log_softmax(own, -1) - F.log_softmax(ours, -1)).abs().max().item()
        tol = 1e-4 if self.compute_dtype == torch.float32 else 5e-2
        if not gap <= tol:
            raise ValueError(f"{type(self.model).__name__}: policy.Policy.logits differs from the model's own logits "
                             f"by up to {gap:.3g} in log-probability (tolerance {tol:g}): its forward does something after "
                             f"the last hidden state that policy.py does not apply; add it to Policy.logits")

    def freeze_reference(self):
        """Make the current policy pi_ref (after the SFT warm start), so the KL keeps PPO near it.

        LoRA on fp32 weights: merge B A into W (rounding ~1e-7 relative) and restart the adapter at B = 0,
        so "LoRA off" is this policy. On bf16/fp16 weights the merge would round most of B A away, so
        the adapter is frozen under a new one instead (LoRALinear.freeze): exact, and no base to write
        again. Full fine-tuning: a new frozen copy. Only a base that changed (a non-zero adapter merged,
        weights that moved) must be written again by the next save."""
        if self.ref_model is not None:
            moved = any(not torch.equal(r, p) for r, p in zip(self.ref_model.parameters(), self.model.parameters()))
            if moved:
                self.ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()
                self.base_path = None
            return
        with torch.no_grad():
            for m in self.lora_modules():
                if m.base.weight.dtype != torch.float32:
                    m.freeze()
                    continue
                if bool(m.B.any()):
                    m.base.weight.add_(m.delta())
                    self.base_path = None  # the base changed: the next save writes it
                nn.init.kaiming_uniform_(m.A, a=math.sqrt(5)); m.B.zero_()

    # ---- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts, max_new_tokens=256, temperature=1.0, top_p=1.0, generators=None, caches=None,
                 logprobs=False):
        """Next turn of each prompt (lists of token ids), batched with the KV cache and left padding.

        Returns the sampled ids of each row, ending with a stop token unless max_new_tokens hit.
        temperature 0 = greedy. generators: one torch.Generator per row (CPU), for sampling.
        caches: optional list, one entry per row, None or (n, [(k, v)] per layer) holding the keys and
        values of the row's first n prompt tokens (its earlier turns); on return each entry holds the
        row's prompt and sampled turn (all but the last token), ready for the row's next turn.
        logprobs: also return each sampled token's log-probability under the policy (temperature 1,
        no top-p), as PPO computes it: (ids, logps), the check that sampler and update agree.
        """
        with self.autocast(), self.merged_lora():
            return self._generate(prompts, max_new_tokens, temperature, top_p, generators, caches, logprobs)

    @contextlib.contextmanager
    def merged_lora(self):
        """Sampling without gradient, fp32 weights: each LoRA projection as one matrix W + (alpha / r) B A,
        not W x plus the adapter's three small matmuls: decoding a token at a time, those took as long as
        W x itself (SmolLM2, 2 CPU threads). In fp32 the merged product differs from the two-path sum by
        rounding only (~1e-7 relative). Made once for everything sampled inside the context (rollout.py
        enters it around a whole batch of episodes; a nested entry reuses it), freed on exit. An adapter
        with B = 0 adds exactly nothing: W itself, no copy.
        bf16/fp16 weights are never merged: W + B A in bf16 keeps a few % of a small update (the policy
        would sample pi_ref plus rounding noise while PPO trains pi_theta), so they sample through the
        same two-path sum as PPO's forward, with no copy of any weight."""
        mods = [m for m in self.lora_modules() if m.enabled and m.merged is None and m.base.weight.dtype == torch.float32]
        try:
            with torch.no_grad():
                for m in mods:
                    m.merged = m.base.weight + m.delta() if bool(m.B.any()) or m.A0.numel() else m.base.weight.detach()
            yield
        finally:
            for m in mods:
                m.merged = None

    def _generate(self, prompts, max_new_tokens, temperature, top_p, generators, caches, logprobs=False):
        dev, B = self.device, len(prompts)
        caches = caches if caches is not None else [None] * B
        # prefill one row at a time: without padding, attention takes its causal kernel; a cached row
        # computes only its new tokens (the last sampled token of its previous turn and the observation)
        rows_kv, logits = [], []
        t0 = time.perf_counter()
        for p, c in zip(prompts, caches):
            n, past = c if c is not None else (0, None)
            if n >= len(p):
                raise ValueError(f"a row's cache holds {n} tokens but its prompt has only {len(p)}: caches are for a next turn")
            cache = DynamicCache(past) if past else DynamicCache()
            out = self.model(input_ids=torch.tensor([p[n:]], device=dev), position_ids=torch.arange(n, len(p), device=dev)[None],
                             cache=cache, use_cache=True, logits_to_keep=1)
            logits.append(out.logits[0, -1].float())
            rows_kv.append([(layer.keys, layer.values) for layer in cache.layers])
        # stack the rows left-padded into buffers sized for the whole turn: decoding copies no cache
        L, lens = max(map(len, prompts)), [len(p) for p in prompts]
        layers = []
        for kv in zip(*rows_kv):                                           # one layer, every row
            k0 = kv[0][0]
            bk = k0.new_zeros(B, k0.shape[1], L + max_new_tokens, k0.shape[3]); bv = torch.zeros_like(bk)
            for r, (k, v) in enumerate(kv):
                bk[r, :, L - lens[r]:L], bv[r, :, L - lens[r]:L] = k[0], v[0]
            layers.append(_TurnBuffer(bk, bv, L))
        cache = Cache(layers=layers)
        mask = torch.tensor([[0] * (L - n) + [1] * n for n in lens], device=dev)   # [B, L]
        logits, pos = torch.stack(logits), torch.tensor(lens, device=dev)[:, None] - 1  # [B, V], [B, 1]
        rows, outs, lps = list(range(B)), [[] for _ in range(B)], [[] for _ in range(B)]
        stop = torch.tensor(self.stop_ids, device=dev)
        t1 = time.perf_counter()
        self.gen_stats["prefill_s"] += t1 - t0
        self.gen_stats["prefill_tokens"] += sum(len(p) - (c[0] if c is not None else 0) for p, c in zip(prompts, caches))

        def keep_cache(j, r):  # row r (at batch index j) is done: its keys and values for the next turn
            m = layers[0].n
            caches[r] = (m - (L - lens[r]), [(l.bk[j:j + 1, :, L - lens[r]:m].clone(), l.bv[j:j + 1, :, L - lens[r]:m].clone())
                                             for l in layers])

        for step in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_p, [generators[r] for r in rows] if generators else None)  # [b]
            done = torch.isin(nxt, stop).tolist()
            for r, tok_id in zip(rows, nxt.tolist()):
                outs[r].append(tok_id)
            if logprobs:
                for r, lp in zip(rows, F.log_softmax(logits, -1).gather(-1, nxt[:, None]).squeeze(-1).tolist()):
                    lps[r].append(lp)
            if step == max_new_tokens - 1:
                done = [True] * len(rows)
            for j, d in enumerate(done):
                if d:
                    keep_cache(j, rows[j])
            keep = [i for i, d in enumerate(done) if not d]
            if not keep:
                break
            if len(keep) < len(rows):  # drop finished rows from the batch and the cache
                k = torch.tensor(keep, device=dev)
                cache.batch_select_indices(k)
                nxt, mask, pos, rows = nxt[k], mask[k], pos[k], [rows[i] for i in keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            pos = pos + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                             cache=cache, use_cache=True)
            logits = out.logits[:, -1].float()
        self.gen_stats["decode_s"] += time.perf_counter() - t1
        self.gen_stats["decode_tokens"] += sum(map(len, outs))
        return (outs, lps) if logprobs else outs

    # ---- tokenization of dialogues ----------------------------------------------------------
    def encode_prompt(self, messages):
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_observation(self, messages, ended):
        """Tokens between the end of the last assistant turn and the next generation prompt.

        messages ends with [..., assistant, observation]; `ended`: the sampled turn ended with the
        end-of-turn token (else the template's end-of-turn is added here, as a non-action token).
        """
        before = self.tok.apply_chat_template(messages[:-1], tokenize=False)
        full = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not full.startswith(before):
            raise ValueError("the chat template re-renders earlier turns; step-wise tokenization needs a "
                             "prefix-stable template")
        k = before.rindex(self.eot)
        text = before[k + len(self.eot) if ended else k:] + full[len(before):]
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        obs = messages[-1]
        if not chat.shows(obs["content"], self.tok.decode(ids, clean_up_tokenization_spaces=False)):
            raise ValueError(f"the chat template dropped a tool response (role '{obs['role']}'): its text is not "
                             f"in the encoded tokens, so the policy would never see it")
        return ids

    def encode_action(self, text):
        """Expert / recorded turns: their tokens followed by the end-of-turn token."""
        return self.tok(text, add_special_tokens=False)["input_ids"] + [self.eot_id]

    def decode_action(self, ids):
        return self.tok.decode([i for i in ids if i not in self.stop_ids], skip_special_tokens=True)

    # ---- saving -----------------------------------------------------------------------------
    def trainable_state(self, state=None):
        """What a checkpoint must hold: LoRA + value head, or (full fine-tuning) every weight of pi_theta
        once; pi_ref is the base, on disk once. state: the state dict to take it from (dist.py's full
        tensors of a policy sharded by FSDP2), else the policy's own."""
        return {k: v for k, v in (self.state_dict() if state is None else state).items()
                if (self.full_finetune and k.startswith("model.")) or k.startswith("v_head.")
                or k.endswith((".A", ".B", ".A0", ".B0"))}

    def load_trainable(self, state, what):
        """A trainable_state (a checkpoint's, or an adapter file's) into this policy; the frozen adapters
        (A0, B0) take the shapes the state has: their rank grows with each freeze_reference."""
        for k, v in state.items():
            if k.endswith((".A0", ".B0")) and k.startswith("model."):
                mod = self.get_submodule(k.rsplit(".", 1)[0])
                setattr(mod, k.rsplit(".", 1)[1], torch.zeros(v.shape, dtype=torch.float32, device=self.device))
        res, trainable = self.load_state_dict(state, strict=False), self.trainable_state()
        missing = [k for k in res.missing_keys if k in trainable and not k.endswith((".A0", ".B0"))]
        if res.unexpected_keys or missing:
            raise ValueError(f"{what}: unexpected weights {res.unexpected_keys[:3]}, missing {missing[:3]}")

    def save_adapter(self, path):
        """The LoRA weights and the value head as one safetensors file (a few MB; not the base), which
        load_policy(base, adapters=[path]) puts back on the same base."""
        from safetensors.torch import save_file
        if not self.lora_cfg:
            raise ValueError("an adapter file holds LoRA weights: this policy is fully fine-tuned")
        # the trainable adapter only: its frozen ones (A0, B0) are the adapter files loaded before it
        save_file({k: v.detach().cpu().contiguous() for k, v in self.trainable_state().items()
                   if not k.endswith((".A0", ".B0"))}, path, metadata={"lora": json.dumps(self.lora_cfg)})

    def load_adapter(self, path, merge=False):
        """An adapter file of save_adapter onto this policy; merge=True folds it into the base weights
        (as freeze_reference does), so that the next adapter file applies on top of it."""
        from safetensors.torch import load_file
        lora = adapter_lora(path)
        if lora is None or {k: lora[k] for k in ("r", "alpha", "targets")} != {k: self.lora_cfg[k] for k in ("r", "alpha", "targets")}:
            raise ValueError(f"{path}: LoRA {lora} does not match the policy's {self.lora_cfg}")
        self.load_trainable(load_file(path, device=str(self.device)), path)
        if merge:
            self.freeze_reference()

    def save(self, path, base_dir=None, state=None):
        """Our checkpoint: policy.json (base, LoRA and load options) + trainable weights + tokenizer.

        The base (the weights LoRA sits on, or pi_ref when fully fine-tuning) is written only when no
        copy is on disk: into base_dir, once per run (later saves refer to it as ../base), or without
        base_dir into path/base. A base from a hub id or a folder is referred to, never copied.
        state: the whole state dict as full tensors, for a policy sharded by FSDP2 (dist.py)."""
        os.makedirs(path, exist_ok=True)
        own = bool(base_dir) and self.base_path is not None and os.path.realpath(self.base_path) == os.path.realpath(base_dir)
        if self.base_path is None or (self.base_owned and not own):  # a random or changed base, or another run's
            target = base_dir or os.path.join(path, "base")
            self._save_base(target, state)
            if base_dir:
                self.base_path, self.base_owned = os.path.abspath(base_dir), True
            base, rel = os.path.relpath(target, path), True
        elif own:
            base, rel = os.path.relpath(self.base_path, path), True     # the run's own base: ../base
        else:
            base, rel = self.base_path, False                         # a hub id, or an absolute folder
        torch.save(self.trainable_state(state), os.path.join(path, "policy.pt"))
        self.tok.save_pretrained(path)
        with open(os.path.join(path, "policy.json"), "w") as f:
            json.dump({"base": base, "base_relative": rel, "lora": self.lora_cfg, "full_finetune": self.full_finetune,
                       "dtype": str(self.compute_dtype).removeprefix("torch."),
                       "gradient_checkpointing": bool(self.model.is_activation_checkpointing)}, f)

    def _save_base(self, path, state=None):
        """The base weights as a save_pretrained folder, written whole (runs.write_dir: a temporary
        name, then a rename)."""
        from harness import runs
        if self.ref_model is not None and state is not None:   # pi_ref's full tensors (FSDP2)
            ref = {k.removeprefix("ref_model."): v for k, v in state.items() if k.startswith("ref_model.")}
            runs.write_dir(path, lambda tmp: self.ref_model.save_pretrained(tmp, state_dict=ref))
            return
        runs.write_dir(path, self.ref_model.save_pretrained if self.ref_model is not None
                       else lambda tmp: self._merged_model_save(tmp, merge=False))

    def export_merged(self, path, state=None):
        """A plain HF checkpoint (LoRA merged into W) that transformers and vLLM load as is, and merge.json
        saying how: W + (alpha / r) B A is computed in fp32 and stored in the model's dtype, so in bf16 the
        stored weights keep only part of a small adapter's change (merge.json gives how much of its norm
        was rounded away; the exact policy is the base + the run's adapter.safetensors). state: the
        policy's full tensors when its own are sharded (dist.py)."""
        err = self._merged_model_save(path, merge=True, state=state)
        self.tok.save_pretrained(path)
        if self.lora_cfg:
            dtype = str(self.compute_dtype).removeprefix("torch.")
            with open(os.path.join(path, "merge.json"), "w") as f:
                json.dump({"lora": self.lora_cfg, "merged_in": "float32", "stored_as": dtype,
                           "adapter_change_rounded_away": err,
                           "about": "W + (alpha / r) (B A + frozen adapters) computed in float32, stored as "
                                    f"{dtype}; adapter_change_rounded_away = |stored - W - delta| / |delta| "
                                    "(Frobenius norms over all adapted weights; 0 if no adapter)"}, f, indent=1)

    def _merged_model_save(self, path, merge, state=None):
        """save_pretrained of the base (merge=False) or of base + adapters (merge=True); returns the
        share of the adapters' change that storing in the model's dtype rounded away (merge=True)."""
        sd, lost, total = {}, 0.0, 0.0
        for name, mod in self.model.named_modules():
            if isinstance(mod, LoRALinear):
                w = mod.base.weight.detach()
                if merge:
                    d = mod.delta().detach()
                    merged = (w.float() + d).to(w.dtype)
                    lost += float(((merged.float() - w.float()) - d).square().sum()); total += float(d.square().sum())
                    w = merged
                sd[name + ".weight"] = w.contiguous()
                if mod.base.bias is not None:
                    sd[name + ".bias"] = mod.base.bias.detach()
        own = self.model.state_dict() if state is None else {k.removeprefix("model."): v for k, v in state.items()
                                                              if k.startswith("model.")}
        for k, v in own.items():
            if ".base." not in k and not k.endswith((".A", ".B", ".A0", ".B0")):
                sd.setdefault(k, v)
        self.model.save_pretrained(path, state_dict=sd)
        return math.sqrt(lost / total) if total else 0.0


def checkpoint_base(ckpt, meta):
    """Where the base of our checkpoint `ckpt` (its policy.json `meta`) is -> (base, relative): a hub id or
    absolute folder as written, or "base" (inside) / "../base" (the run's) relative to the checkpoint;
    realpath: "../base" of a checkpoint reached through a symlink is beside the real folder."""
    relative = meta.get("base_relative", meta["base"] == "base")
    return (os.path.normpath(os.path.join(os.path.realpath(ckpt), meta["base"])) if relative else meta["base"]), relative


def adapter_lora(path):
    """The LoRA settings an adapter file (Policy.save_adapter) was written with, or None."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            return json.loads((f.metadata() or {}).get("lora", "null"))
    except (OSError, ValueError, SafetensorError) as e:   # missing, or not a safetensors file
        raise ValueError(f"adapter file {path}: {e}") from None


def _sample(logits, temperature, top_p, gens):
    """One token per row; inverse-CDF sampling with one uniform per row from its own generator."""
    if temperature == 0:
        return logits.argmax(-1)
    p = F.softmax(logits / temperature, -1)                                   # [b, V]
    idx = None
    if top_p < 1.0:                                                           # (a sort costs more than the model at small b)
        p, idx = p.sort(-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p > top_p, 0.0)                      # nucleus: smallest set with mass >= top_p
    cdf = p.cumsum(-1)
    u = torch.stack([torch.rand((), generator=g) for g in gens]) if gens else torch.rand(len(p))
    u = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)                          # [b, 1], scaled to the kept mass
    k = torch.searchsorted(cdf, u).clamp(max=p.shape[-1] - 1)
    return (k if idx is None else idx.gather(-1, k)).squeeze(-1)


def _hub_reachable(timeout=3.0):
    """Does the Hub (HF_ENDPOINT) answer within `timeout` s? Probed in a thread: DNS ignores timeouts."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    import threading
    import requests
    ok = []
    def probe():
        try:
            requests.head(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout=timeout)
            ok.append(True)
        except requests.RequestException:
            pass
    t = threading.Thread(target=probe, daemon=True)
    t.start(); t.join(timeout + 1)
    return bool(ok)


def _load_tokenizer(path, **kw):
    """AutoTokenizer, except that a tokenizer saved as a plain `tokenizers` backend (the tiny BPE) is
    read exactly as saved: transformers 5 loads any folder whose config.json says qwen2 as a
    Qwen2Tokenizer, with Qwen2's hard-coded pre-tokenizer, which splits text differently."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            plain = json.load(f).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")
    except (OSError, ValueError):
        plain = False
    return (PreTrainedTokenizerFast if plain else AutoTokenizer).from_pretrained(path, **kw)


def default_device(device=None):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy(name, device=None, dtype=None, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                lora_targets=LORA_TARGETS, full_finetune=False, gradient_checkpointing=None, seed=0, tiny=None,
                adapters=()):
    """Any HF causal LM id or folder, a .gguf file, `smollm2` (models.py), our checkpoint folder, or
    "tiny" -> Policy on `device`.

    bf16 on CUDA, fp32 on CPU unless `dtype` says otherwise. Hub ids need network; without it only
    the local Hub cache is tried (a few seconds), so pass a local folder (save_pretrained) instead.
    A checkpoint of ours restores every load option it was trained with (LoRA, full fine-tuning,
    dtype, gradient checkpointing); `dtype` and `gradient_checkpointing`, when given, override it.
    adapters: save_adapter files applied in order, each but the last merged into the base (an SFT
    start's adapter, then an RL adapter trained on top of it).
    """
    from transformers import AutoModelForCausalLM
    device = default_device(device)
    ckpt = os.path.isfile(os.path.join(str(name), "policy.json"))
    if ckpt:
        with open(os.path.join(name, "policy.json")) as f:
            meta = json.load(f)
        base, relative = checkpoint_base(name, meta)
        lora, full_finetune = meta["lora"], meta["full_finetune"]
        dtype = dtype or DTYPES.get(meta.get("dtype"))
        if gradient_checkpointing is None:
            gradient_checkpointing = bool(meta.get("gradient_checkpointing", False))
    elif adapters:   # LoRA as the adapter files were trained with
        base, lora = name, {**adapter_lora(adapters[0]), "dropout": lora_dropout}
    else:
        base, lora = name, (None if full_finetune else dict(r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
                                                            targets=list(lora_targets)))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    weights = torch.float32 if full_finetune else dtype  # full fine-tuning: fp32 master weights, `dtype` compute
    if base == "tiny":
        model, tok = build_tiny(seed, **(tiny or {}))  # tiny: size overrides of TINY
    else:
        from harness import models
        path = models.resolve(base)  # `smollm2` or a .gguf file: a plain folder in the cache, converted once
        # a name that is no folder is a Hub id: without network only the local cache is tried, so we
        # fail in seconds instead of after huggingface_hub's retries (~50 s)
        offline = not os.path.isdir(path) and not _hub_reachable()
        try:
            tok = _load_tokenizer(name if ckpt else path, local_files_only=offline)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=weights, local_files_only=offline)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load model '{base}': {e}\nWithout network access, pass a local folder "
                             "written by save_pretrained (or one of our checkpoints) as --model.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = chat.CHAT_TEMPLATE  # base models ship none; ChatML as the original's Qwen2 data
    model.to(device=device, dtype=weights)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model.requires_grad_(False)
        inject_lora(model, lora["r"], lora["alpha"], lora["dropout"], tuple(lora["targets"]))
    policy = Policy(model, tok, base, lora, full_finetune, compute_dtype=dtype).to(device)
    if ckpt:
        policy.base_owned = relative  # a run's own base/: a save into another folder writes a copy
        policy.load_trainable(torch.load(os.path.join(name, "policy.pt"), map_location=device, weights_only=True),
                              f"{name}/policy.pt")
    for i, a in enumerate(adapters):
        policy.load_adapter(a, merge=i < len(adapters) - 1)
    policy.check_logits()
    return policy


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Write the tiny model and tokenizer with save_pretrained")
    ap.add_argument("--save-tiny", required=True, metavar="DIR")
    a = ap.parse_args()
    m, t = build_tiny()
    m.save_pretrained(a.save_tiny); t.save_pretrained(a.save_tiny)
    print(f"tiny Qwen2 ({sum(p.numel() for p in m.parameters()) / 1e6:.1f} M params, vocab {len(t)}) -> {a.save_tiny}")
