"""The policy pi_theta of StepTool (paper Sec. 4.2): a causal LM + hand-written LoRA + a value head.

- LoRA (Hu et al. 2021): W x + (alpha / r) B A x on the attention and MLP projections; B starts at 0,
  so a fresh adapter is an exact no-op. Only LoRA and value-head weights train by default.
- pi_ref, the KL penalty's reference, is the same weights with the trainable LoRA switched off (no
  second copy; frozen adapters stay on); with --full-finetune it is a frozen copy.
- V(s) is one linear layer on the last hidden state (as trl's ValueHead).
- Logits only for the action tokens, as the model's own forward makes them, the log-softmax over the
  vocabulary in chunks of action tokens, so memory does not grow by a [tokens, vocabulary] tensor.
- `encode_*` turn a dialogue into token ids turn by turn, in the chat template's end of turn and role
  for tool responses, detected once. Sampling: rollout.generate; loading and saving: harness/models.py.

Departures from the original code:
1. The original wraps peft + trl's AutoModelForCausalLMWithValueHead; both are replaced by ~60
   lines here so a reader sees exactly which weights train.
2. `tiny` is a random ~1.6 M-parameter Qwen2 with a BPE tokenizer trained on the embedded
   benchmark's train split (harness/models.py): the CPU stand-in for Qwen2-7B (same code path).
3. One policy whatever the dtype: bf16 weights are never merged with an adapter (rollout.generate samples
   through the same two-path sum; freeze_reference stacks the SFT adapter under the trainable one).
"""
import contextlib
import copy
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the log-softmax runs over chunks of at most this many logits (2^26 fp32 = 256 MB: 441 tokens of a 152k vocabulary)
LOGIT_CHUNK_ELEMENTS = 1 << 26
# ChatML, for models that ship no template (base models); the original's Qwen2 data is ChatML
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_PROBE = '{"error": "", "response": "XYZZY <tool & reply\'s> 42"}'  # observation_role's: shaped like an observation


# ---- LoRA -----------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """y = W x + (alpha / r) (B A dropout(x) + B0 A0 x); W frozen, A ~ Kaiming, B = 0 (an exact no-op at start).
    A, B fp32 whatever W's dtype (bf16 loses most of an Adam update). A0, B0 (rank 0 unless set): adapters
    frozen under it by freeze_reference on a bf16 base, where W + B A would round most of B A away."""

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

    merged, transposed = None, False   # W + (alpha/r)(B A + B0 A0) while fp32 samples (rollout.merged_lora); CPU: [in, out]

    def forward(self, x):
        if self.merged is not None and not self.transposed:
            return F.linear(x, self.merged, self.base.bias)
        if self.merged is not None:
            return x @ self.merged if self.base.bias is None else x @ self.merged + self.base.bias
        y, frozen = self.base(x), self.A0.numel() > 0
        if not (frozen or self.enabled):
            return y
        xf = x.to(self.A.dtype)                                               # cast once for both adapters
        # both adapters in one product of rank r0 + r (pi_ref's B0 A0 x never dropped out): one [tokens, out] product
        if frozen and self.enabled:
            u, B = torch.cat([xf @ self.A0.T, self.drop(xf) @ self.A.T], -1), torch.cat([self.B0, self.B], 1)
        else:
            u, B = (xf @ self.A0.T, self.B0) if frozen else (self.drop(xf) @ self.A.T, self.B)
        return y + ((u @ B.T) * self.scale).to(y.dtype)

    def delta(self):
        """(alpha / r) (B A + B0 A0): what the adapters add to W, in fp32."""
        ba = self.B @ self.A
        return self.scale * (ba + self.B0 @ self.A0 if self.A0.numel() else ba)

    def freeze(self):
        """The trainable adapter joins the frozen ones (exactly: rank-stacked) and restarts at B = 0."""
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


# ---- the chat template (Sec. 3: s_t is the dialogue so far; a transition appends the tool's response) ----
def end_of_turn(tok):
    """The token that ends an assistant turn in this chat template (<|im_end|>: ChatML, <|eot_id|>: Llama-3.1)."""
    probe = "XYZZY"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                                   tokenize=False)
    tail = tok(text[text.rindex(probe) + len(probe):], add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>", "<|end|>")
                                          if t in tok.get_vocab()}
    eot = next((i for i in tail if i in special), tok.eos_token_id)
    if eot is None:
        raise ValueError("cannot find the end-of-turn token of this chat template")
    return eot, tok.convert_ids_to_tokens(eot)


def observation_role(tok):
    """The role for tool responses: the first the template renders of its own `tool` (Qwen2.5, Llama-3.1),
    ToolBench's `function` (the original's Qwen2 data), `tool`, `user`; none is an error."""
    src = tok.chat_template if isinstance(tok.chat_template, str) else json.dumps(tok.chat_template)
    roles = (("tool",) if re.search(r"""['"]tool['"]""", src or "") else ()) + ("function", "tool", "user")
    for role in roles:
        msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}, {"role": role, "content": _PROBE}]
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 -- a template may raise_exception() on a role it refuses
            continue
        if shows(_PROBE, text):
            return role
    raise ValueError("the chat template renders no tool response in any role (tried function, tool, user)")


def shows(content, text):
    """Does `text` carry `content`, verbatim (some templates trim it) or as JSON (Llama-3.1's tojson)?"""
    c = content.strip()
    enc = [json.dumps(content, ensure_ascii=False), json.dumps(content)]
    enc.append(enc[1].replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("'", "\\u0027"))
    return any(v in text for v in [c] + enc)


# ---- the policy -----------------------------------------------------------------------------
class Policy(nn.Module):
    """pi_theta (LM + LoRA) and V (value head): one nn.Module, so DDP/FSDP wrap it in one place. source: hub id,
    folder, .gguf or "tiny"; base_path (None: not on disk), base_owned: for harness.models.save_policy."""

    def __init__(self, model, tok, source, lora=None, full_finetune=False, compute_dtype=None):
        super().__init__()
        self.model, self.tok, self.source, self.lora_cfg = model, tok, source, lora
        self.full_finetune = full_finetune
        self.base_path = None if source == "tiny" else os.path.abspath(source) if os.path.exists(source) else source
        self.base_owned = False
        # full fine-tuning in half precision: fp32 master weights under autocast (Adam steps of ~1e-5
        # relative vanish in bf16); pi_ref is a frozen copy of them, so pi_theta = pi_ref exactly at start
        self.compute_dtype = compute_dtype or next(model.parameters()).dtype
        if full_finetune and self.compute_dtype == torch.float16:
            raise ValueError("full fine-tuning in float16 needs a loss scaler, which is not here: use bfloat16")
        if full_finetune and self.compute_dtype != torch.float32:
            model.float()
        self.ref_model = copy.deepcopy(model).requires_grad_(False).eval() if full_finetune else None
        self.v_head = nn.Linear(model.config.hidden_size, 1, device=model.device)  # fp32, as LoRA
        nn.init.zeros_(self.v_head.bias); nn.init.normal_(self.v_head.weight, std=1 / (model.config.hidden_size + 1))
        self.eot_id, self.eot = end_of_turn(tok)
        # a turn ends at the end of turn or any EOS of the tokenizer or generation_config (Qwen2: <|endoftext|>)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [tok.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])]
        self.stop_ids = sorted({self.eot_id, *[i for i in eos if i is not None]})
        self.obs_role = observation_role(tok)  # the chat template's role for tool responses
        # seconds and tokens of sampling (rollout.generate), logged each iteration
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
        """The PPO update's mode: all in eval (no dropout: pi_theta = prepare()'s pi_old until the first step),
        but the decoder layers that gradient checkpointing runs in are flagged training (it checks that flag)."""
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
        """ids, mask [B, T] (any padding side); act_idx ([N], [N]) (row, position) of each action token, act_tok [N]
        its id; v_idx ([U], [U]) where V is read (a state's last token) -> logp [N], values [U], ent [N] or None."""
        # right padding needs no mask (a real token never sees the pads after it): without one, and with
        # plain 0..T-1 positions, attention takes its causal kernel, which skips the masked half
        if bool((mask[:, 1:] <= mask[:, :-1]).all()):                         # right padded (or none)
            pos, attn = torch.arange(ids.shape[1], device=ids.device).expand_as(ids), None
        else:
            pos, attn = (mask.long().cumsum(-1) - 1).clamp(min=0), mask       # [B, T]
        b, t = act_idx
        with self.autocast():
            h = self.model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
            h_act = h[b, t - 1]                                                # [N, H]: token t is predicted at t-1
            # the vocabulary-wide part in chunks of action tokens; while training with more than one chunk,
            # each is recomputed in backward (checkpoint), so memory holds one chunk's [n, V] logits
            n = max(1, LOGIT_CHUNK_ELEMENTS // self.model.get_output_embeddings().weight.shape[0])
            grad = torch.is_grad_enabled() and len(act_tok) > n
            parts = [checkpoint(self._token_logp, h_act[i:i + n], act_tok[i:i + n], entropy, use_reentrant=False)
                     if grad else self._token_logp(h_act[i:i + n], act_tok[i:i + n], entropy)
                     for i in range(0, len(act_tok), n)]
        logp = torch.cat([p[0] for p in parts]) if parts else h.new_zeros(0, dtype=torch.float32)   # [N]
        ent = (torch.cat([p[1] for p in parts]) if parts else logp.clone()) if entropy else None     # [N]
        values = self.v_head(h[v_idx].float()).squeeze(-1)                    # [U]
        return logp, values, ent

    def logits(self, h):
        """[n, H] last hidden states -> [n, V] fp32 logits, as the model's own forward makes them (the LM head,
        Cohere's logit_scale, Granite's logits_scaling, Gemma 2/3's soft-capping); checked at load."""
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

    def freeze_reference(self):
        """The current policy becomes pi_ref (the SFT start). fp32 LoRA: B A merged into W (~1e-7 rounding),
        B = 0; bf16/fp16: frozen under a new adapter (exact); full fine-tuning: a new frozen copy."""
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

    def trainable_state(self, state=None):
        """The weights that train (a checkpoint's): LoRA + value head, or (full fine-tuning) all pi_theta's;
        of `state` (FSDP2's full tensors) or the policy's own."""
        return {k: v for k, v in (self.state_dict() if state is None else state).items()
                if (self.full_finetune and k.startswith("model.")) or k.startswith("v_head.")
                or k.endswith((".A", ".B", ".A0", ".B0"))}

    # ---- tokenization of dialogues ----------------------------------------------------------
    def encode_prompt(self, messages):
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_observation(self, messages, ended):
        """Tokens from the end of the last assistant turn (messages: [..., assistant, observation]) to the next
        generation prompt; the end of turn too (context, not action) unless the sampled turn `ended` with it."""
        before = self.tok.apply_chat_template(messages[:-1], tokenize=False)
        full = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not full.startswith(before):
            raise ValueError("the chat template re-renders earlier turns; step-wise tokenization needs a "
                             "prefix-stable template")
        k = before.rindex(self.eot)
        text = before[k + len(self.eot) if ended else k:] + full[len(before):]
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        obs = messages[-1]
        if not shows(obs["content"], self.tok.decode(ids, clean_up_tokenization_spaces=False)):
            raise ValueError(f"the chat template dropped a tool response (role '{obs['role']}'): its text is not "
                             f"in the encoded tokens, so the policy would never see it")
        return ids

    def encode_action(self, text):
        """Expert / recorded turns: their tokens followed by the end-of-turn token."""
        return self.tok(text, add_special_tokens=False)["input_ids"] + [self.eot_id]

    def decode_action(self, ids):
        return self.tok.decode([i for i in ids if i not in self.stop_ids], skip_special_tokens=True)
