"""The memory plan of a run: gradient checkpointing and the micro-batches, chosen to fit the device.

    plan = memory.plan(policy, cfg, given)   # steptool.py, once the model is loaded; prints one line

What a PPO or SFT forward of one episode keeps for backward is measured on the loaded model itself (a
forward of 64 and of 128 tokens under autograd's saved-tensor hooks, without and with gradient
checkpointing), scaled to a --max-context episode, and added to the weights, the trainable weights'
gradients and Adam moments (fp32: 12 bytes each) and, while sampling, the KV cache of a batch of
episodes. The plan is the largest of the update (PPO mini-batch), SFT (micro-batch) and rollout
phases; it must fit FIT of the device's memory (a GPU's total, or the machine's RAM on CPU).

Choice, for what the command line did not fix: gradient checkpointing off if both micro-batches fit
without it, else on; then the largest micro-batches up to the configured ones that fit (the optimizer
step keeps its number of episodes: --grad-accum grows as the PPO mini-batch shrinks). Nothing fits:
the smallest plan is kept and the printed line says it will not fit.

Departures: the plan assumes every weight on every process (under FSDP2 it overestimates), and
counts the saved tensors, not the allocator's fragmentation or the transient [tokens, vocabulary]
chunk of the log-softmax: FIT leaves a tenth for those.
"""
import os

import torch

from harness import bench

FIT = 0.9


def device_bytes(device):
    """What the plan must fit in: a GPU's total memory, or the RAM not in use when the run starts (MemAvailable:
    a run started beside others plans for what they leave; the machine's RAM where /proc/meminfo is absent)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(total, available_bytes() or total)


def available_bytes(meminfo="/proc/meminfo"):
    """MemAvailable of the kernel's meminfo in bytes, or None where it cannot be read."""
    try:
        with open(meminfo) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def episode_bytes(policy, tokens):
    """What one `tokens`-token episode keeps for backward -> {checkpointing: bytes}, from two measured
    lengths (bench.saved_for_backward at 64 and 128 tokens, a quarter of them action tokens; linear in
    tokens: attention keeps O(tokens) with the fused kernels), without and with gradient checkpointing.
    With checkpointing, one layer's activations are recomputed at a time in backward: added on top."""
    model, was, mode = policy.model, bool(policy.model.is_activation_checkpointing), policy.training
    measured = {}
    try:
        for ckpt in (False, True):
            if ckpt:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.activation_checkpointing_disable()
            with torch.enable_grad():
                s64, s128 = (sum(bench.saved_for_backward(policy, t, t // 4).values()) for t in (64, 128))
            measured[ckpt] = (s128 - s64) / 64, 2 * s64 - s128          # per token, fixed
    finally:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False}) if was \
            else model.activation_checkpointing_disable()
        policy.train(mode)
    layers = model.config.get_text_config().num_hidden_layers
    one_layer = (measured[False][0] - measured[True][0]) / layers * tokens   # recomputed in backward
    return {ck: max(fixed + per_tok * tokens + (one_layer if ck else 0.0), 0.0) for ck, (per_tok, fixed) in measured.items()}


def kv_bytes(policy, episodes, tokens):
    """The KV cache of `episodes` episodes of `tokens` tokens while sampling."""
    c = policy.model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return episodes * tokens * c.num_hidden_layers * 2 * kv_heads * head_dim * policy.compute_dtype.itemsize


def plan(policy, cfg, given=(), log=print):
    """Sets cfg.gradient_checkpointing, cfg.mini_batch_size, cfg.grad_accum and cfg.sft_micro_batch_size
    where `given` (the flags named on the command line) leaves them open, turns checkpointing on in
    the model if chosen, prints what was chosen and why; returns the plan's figures."""
    T = cfg.max_context
    weights = sum(t.numel() * t.element_size() for t in [*policy.parameters(), *policy.buffers()])
    optim = 12 * sum(p.numel() for p in policy.parameters() if p.requires_grad)    # fp32 grad + Adam's two moments
    fixed = weights + optim
    rollout_need = kv_bytes(policy, cfg.episodes_per_iteration, T)
    total = device_bytes(policy.device)
    budget = FIT * total
    ep = episode_bytes(policy, T)                                          # {checkpointing: bytes}
    sft = cfg.sft_epochs and not cfg.data
    mb0, smb0 = cfg.mini_batch_size, cfg.sft_micro_batch_size

    def need(ck, mb, smb):
        return fixed + max(ep[ck] * max(mb, smb if sft else 0), rollout_need)

    ckpts = [cfg.gradient_checkpointing] if "gradient_checkpointing" in given else [False, True]
    mbs = [mb0] if "mini_batch_size" in given else list(range(mb0, 0, -1))
    smbs = [smb0] if "sft_micro_batch_size" in given or not sft else list(range(smb0, 0, -1))
    options = [(ck, mb, smb) for ck in ckpts for mb in mbs for smb in smbs]
    fits = [o for o in options if need(*o) <= budget]
    # the first that fits: no checkpointing before checkpointing, then the largest PPO, then SFT, micro-batch
    ck, mb, smb = fits[0] if fits else min(options, key=lambda o: need(*o))
    cfg.gradient_checkpointing = bool(ck)
    if mb != mb0 and "grad_accum" not in given:
        cfg.grad_accum = max(1, cfg.grad_accum * mb0 // mb)           # the same episodes per optimizer step
    cfg.mini_batch_size, cfg.sft_micro_batch_size = mb, smb
    if ck:
        policy.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        policy.model.activation_checkpointing_disable()
    gb = lambda b: f"{b / 1e9:.1f} GB"
    where = torch.cuda.get_device_name(policy.device) if policy.device.type == "cuda" else "CPU RAM available"
    why = ("given" if "gradient_checkpointing" in given else "fits without it" if not ck else
           f"without it even one episode at a time needs {gb(need(False, 1, 1))}")
    line = (f"memory plan: weights {gb(weights)} + gradients and Adam {gb(optim)}; a {T}-token episode keeps "
            f"{gb(ep[False])} for backward ({gb(ep[True])} with gradient checkpointing); sampling "
            f"{cfg.episodes_per_iteration} episodes keeps {gb(rollout_need)} of KV cache -> gradient checkpointing "
            f"{'on' if ck else 'off'} ({why}), PPO mini-batch {mb}" + (f" x {cfg.grad_accum} accumulated" if mb != mb0 else "")
            + (f", SFT micro-batch {smb}" if sft else "") + f": {gb(need(ck, mb, smb))} of {gb(total)} ({where})")
    if not fits:
        line += f"; more than {FIT:.0%} of it: expect out-of-memory (lower --max-context or --episodes-per-iteration)"
    log(line)
    return {"weights": weights, "optimizer": optim, "episode": ep[False], "episode_checkpointed": ep[True],
            "rollout": rollout_need, "device": total, "need": need(ck, mb, smb), "fits": bool(fits),
            "gradient_checkpointing": bool(ck), "mini_batch_size": mb, "sft_micro_batch_size": smb}
