"""Benchmarks of the PPO update, the rollouts and the memory a PPO forward keeps for backward.

    python -m harness.bench                                    # update + rollouts, tiny model, fixed shapes
    python -m harness.bench --model DIR --data FILE.tsv        # the update in the paper config on StepTool TSV trajectories
    python -m harness.bench --model smollm2 --updates 1        # a real LM: the update against raw forward + backward
    python -m harness.bench ... --compare-trl /path/to/python  # and trl 0.11.4's PPOTrainer.step on the same data, first
    python -m harness.bench --memory [--shape qwen2-7b]        # bytes saved for backward per token and layer
    python -m harness.bench --gpu-check --device cuda --shape qwen2-7b   # the update and rollouts of a 7B shape, one GPU
    python -m harness.bench --sampling --shape smollm2 --check-layers 4  # a bf16 policy's sampling: exact vs merged

Figures are printed (one JSON object last); the README quotes them with the machine named. Speed
is never asserted in tests, only that each figure is produced.

The GPU check (`--gpu-check`) builds the shape from its config with random weights (no
download), in bf16 with LoRA r 8 on every projection, and reports for 4,096-token episodes (1,000
action tokens each), mini-batch 1 and 2, with and without gradient checkpointing: seconds per PPO
update (4 episodes, one epoch, one optimizer step: pi_old and pi_ref passes, then forward and backward
of each mini-batch), tokens/s, MFU (bench.update_flops over the GPU's dense bf16 peak: PEAK_TFLOPS
by device name, or --peak-tflops), and peak memory (torch.cuda.max_memory_allocated) beside the
README's memory plan for the same configuration (its per-token figures measured here first, on this
device); a configuration that does not fit says OOM. MFU counts model FLOPs: the forward that
gradient checkpointing recomputes is not counted. Then rollouts: one sampled turn (512-token
prompts, 128 new tokens) at batch 8, 16 and 32, in sampled tokens/s. On CPU it runs the same code
(peak memory is then the process's peak RSS, and the peak a measured matmul's).
"""
import argparse
import json
import os
import resource
import time

import torch

import ppo
import rollout


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def update_flops(c, tokens, action_tokens, sum_sq_len, cfg):
    """Model FLOPs of one update: (2 no-grad passes + epochs x (forward + activation backward ~ 1 forward))
    x [2 * body params per token + causal attention 2 * layers * hidden * len^2 / 2 per episode * 2
    + the LM head at action tokens only]. LoRA's few FLOPs are left out."""
    H, L, I, V = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    kv = H // c.num_attention_heads * c.num_key_value_heads
    body = L * (2 * H * H + 2 * H * kv + 3 * H * I)                     # q, o, k, v, gate, up, down
    fwd = 2 * body * tokens + 2 * L * H * sum_sq_len + 2 * H * V * action_tokens
    return fwd * (2 + 2 * cfg.ppo_epochs)


BENCH_TINY = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688)  # the bench's fixed "tiny" (3.4 M)


def bench(args):
    from harness import models
    trl = compare_trl(args) if args.compare_trl else None   # trl first, then ours, in one command
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    pol = models.load_policy(args.model, device=args.device, lora_r=8, lora_alpha=16, lora_dropout=0.0, tiny=BENCH_TINY)
    cfg = ppo.PPOConfig(advantage=args.advantage)
    if args.data:
        from harness import formats, offline
        rows = formats.read_tsv(args.data)
        all_eps, dropped = offline.episodes_from_rows(pol, rows, max_tokens=args.max_tokens)
        batches = [[all_eps[(i * cfg.batch_size + j) % len(all_eps)] for j in range(cfg.batch_size)] for i in range(args.updates + 1)]
        shape = f"{len(rows)} TSV trajectories, last {args.max_tokens} tokens, {dropped} cut steps dropped"
    else:
        g = torch.Generator().manual_seed(0)
        V = len(pol.tok)
        def synth():
            ep = rollout.Episode(); ep.add_context(torch.randint(3, V, (400,), generator=g).tolist())
            for t in range(3):
                ep.add_action(torch.randint(3, V, (64,), generator=g).tolist())
                ep.add_context(torch.randint(3, V, (150,), generator=g).tolist())
            ep.rewards = [0.5, 1.0, 0.0]
            return ep
        batches = [[synth() for _ in range(cfg.batch_size)] for _ in range(args.updates + 1)]
        shape = "8 synthetic episodes x 1,042 tokens (400 prompt + 3 x (64 action + 150 observation))"
    opt, kl = ppo.make_optimizer(pol, cfg), ppo.KLController(cfg)
    times = []
    for i, b in enumerate(batches):
        t0 = time.perf_counter()
        ppo.update(pol, opt, [rollout.Episode(e.ids, e.act, e.step, e.state_end, e.rewards) for e in b], cfg, kl)
        if i:  # the first update is a warm-up
            times.append(time.perf_counter() - t0)
    toks = [sum(len(e.ids) for e in b) for b in batches[1:]]
    acts = [sum(sum(e.act) for e in b) for b in batches[1:]]
    med = sorted(times)[len(times) // 2]
    out = {"impl": "steptool", "shape": shape, "update_s_median": med, "tokens_per_update": sum(toks) / len(toks),
           "update_tokens_per_s": sum(toks) / sum(times), "peak_rss_mib": _peak_rss_mib(), "threads": args.threads}
    out["update_gflop"] = update_flops(pol.model.config, sum(toks) / len(toks), sum(acts) / len(acts),
                                       sum(len(e.ids) ** 2 for b in batches[1:] for e in b) / len(times), cfg) / 1e9
    try:
        from harness.bench_trl import matmul_peak_gflops
        peak = matmul_peak_gflops(threads=args.threads)
        out.update(matmul_peak_gflops=peak, peak_fraction=out["update_gflop"] * len(times) / sum(times) / peak)
    except ImportError:
        pass
    out.update(bench_raw(pol, batches[1:], cfg, med, times))
    if not args.data and args.rollouts and args.model == "tiny":
        out.update(bench_rollouts(pol, args))
    print(f"update: {med:.2f} s median over {len(times)}, {out['update_tokens_per_s']:.0f} tokens/s, peak RSS {out['peak_rss_mib']:.0f} MiB ({shape})")
    if trl:
        out["trl"] = trl
        out["speedup_vs_trl"] = out["update_tokens_per_s"] / trl["update_tokens_per_s"]
        out["peak_rss_ratio_vs_trl"] = out["peak_rss_mib"] / trl["peak_rss_mib"]
        print(f"trl 0.11.4: {trl['update_s_median']:.2f} s median, {trl['update_tokens_per_s']:.0f} tokens/s, peak RSS "
              f"{trl['peak_rss_mib']:.0f} MiB -> ours {out['speedup_vs_trl']:.2f}x its real tokens/s")
    print(json.dumps(out))


def bench_raw(pol, batches, cfg, update_median, update_times):
    """The same episodes through the bare model, one at a time (no padding), as transformers computes
    a language-model loss (logits at every token): a forward without gradient, and a forward with the
    backward of that loss into the LoRA weights (base frozen). An update costs 2 forwards (pi_old,
    pi_ref) + ppo_epochs forward-backwards of its tokens: at the raw rates that takes `ideal` seconds;
    `update_vs_raw` = ideal / measured (1.0 = the update costs no more than the raw passes)."""
    import torch.nn.functional as F
    fwd_t = bwd_t = body_t = 0.0
    n = 0
    for b in batches:
        for e in b:
            ids = torch.tensor([e.ids], device=pol.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                pol.model(input_ids=ids)
            t1 = time.perf_counter()
            logits = pol.model(input_ids=ids).logits
            F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
            t2 = time.perf_counter()
            pol.model.model(input_ids=ids).last_hidden_state.float().square().mean().backward()  # no LM head
            fwd_t, bwd_t, body_t = fwd_t + t1 - t0, bwd_t + t2 - t1, body_t + time.perf_counter() - t2
            n += len(e.ids)
    pol.zero_grad(set_to_none=True)
    fwd, fwdbwd, body = n / fwd_t, n / bwd_t, n / body_t
    per_update = n / len(batches)
    ideal = per_update * (2 / fwd + cfg.ppo_epochs / fwdbwd)
    epoch_rate = per_update * cfg.ppo_epochs * len(update_times) / sum(update_times)
    print(f"raw passes on the same episodes: forward {fwd:.0f} tokens/s, forward + backward {fwdbwd:.0f} tokens/s "
          f"(without the LM head {body:.0f}) -> an update at raw speed {ideal:.1f} s, measured {update_median:.1f} s: "
          f"{ideal / update_median:.0%} of raw; {epoch_rate:.0f} tokens x epochs / s, its no-gradient passes included")
    return {"raw_forward_tokens_per_s": fwd, "raw_forward_backward_tokens_per_s": fwdbwd, "update_ideal_s": ideal,
            "raw_forward_backward_no_lm_head_tokens_per_s": body,
            "update_vs_raw": ideal / update_median,
            "update_epoch_tokens_per_s": epoch_rate}


def compare_trl(args):
    """Run bench_trl.py's trl timing (its own interpreter: trl 0.11.4 needs transformers 4.46) on the same
    model and data, right before ours in the same command; returns its JSON summary."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([args.compare_trl, os.path.join(here, "bench_trl.py"), "trl", "--model", args.model, "--data",
                        args.data, "--updates", str(args.updates), "--threads", str(args.threads)],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"harness.bench --compare-trl: bench_trl.py failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_rollouts(pol, args):
    """16 episodes batched vs one at a time, on the embedded server (tiny random model: long, wrong turns).
    The two modes alternate, --reps times each after a warm-up; medians and the ratio of medians."""
    from harness import formats, server, toolclient
    srv = server.start_in_thread()
    try:
        client = toolclient.ToolClient(srv.url)
        tasks = formats.load_tasks(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "bench_test.json"))[:16]
        kw = dict(max_steps=3, max_new_tokens=64, temperature=1.0)
        rates = {"batched": [], "sequential": []}
        for rep in range(args.reps + 1):
            for name, groups in (("batched", [tasks]), ("sequential", [[t] for t in tasks])):
                t0, new = time.perf_counter(), 0
                for i, grp in enumerate(groups):
                    eps, _ = rollout.rollout(pol, grp, client, first_episode=i, **kw)
                    new += sum(sum(e.act) for e in eps)
                dt = time.perf_counter() - t0
                if rep:  # rep 0 is a warm-up
                    rates[name].append(new / dt)
                    print(f"rollout {name}: {new} sampled tokens in {dt:.1f} s = {new / dt:.0f} tokens/s")
        med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
        print(f"rollouts, median of {args.reps}: batched {med['batched']:.0f}, one at a time {med['sequential']:.0f} "
              f"tokens/s = {med['batched'] / med['sequential']:.1f}x")
        return {"rollout_batched_tokens_per_s": med["batched"], "rollout_sequential_tokens_per_s": med["sequential"],
                "rollout_speedup": med["batched"] / med["sequential"], "rollout_reps": args.reps}
    finally:
        srv.shutdown()


# ---- memory: what a PPO forward keeps for backward -------------------------------------------
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHAPES = {  # model shapes built from their config with random weights (no download)
    "qwen2-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                     num_key_value_heads=4, num_hidden_layers=28, tie_word_embeddings=False),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                    num_key_value_heads=3, num_hidden_layers=30, tie_word_embeddings=True),   # its sizes, as a Qwen2
    "small": dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=28, tie_word_embeddings=False),
}


def shaped_policy(shape, layers, dtype, device="cpu", lora_r=8):
    """A random Qwen2 of a named shape with `layers` layers, LoRA on every projection (load_policy's way)."""
    import policy as P
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config
    from tokenizers import Tokenizer, models
    cfg = Qwen2Config(**{**SHAPES[shape], "num_hidden_layers": layers}, max_position_embeddings=32768)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.config.use_cache = False
    model.requires_grad_(False)
    P.inject_lora(model, lora_r, 2 * lora_r, 0.0)
    vocab = {"<|im_start|>": 0, "<|im_end|>": 1, "a": 2}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="a")),
                                  eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=P.CHAT_TEMPLATE)
    return P.Policy(model, tok, "tiny", dict(r=lora_r, alpha=2 * lora_r, dropout=0.0, targets=list(P.LORA_TARGETS)))


def saved_for_backward(pol, tokens, actions):
    """Bytes autograd keeps for backward in one PPO forward of one episode of `tokens` tokens whose last
    `actions` are action tokens: {dtype: bytes}, each storage once, parameters and buffers left out.
    memory.py's plan of a run measures its loaded model with it."""
    params = {t.untyped_storage().data_ptr() for t in [*pol.parameters(), *pol.buffers()]}
    kept = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            kept[st.data_ptr()] = (st.nbytes(), str(t.dtype).removeprefix("torch."))
        return t

    ep = rollout.Episode()
    ep.add_context([2] * (tokens - actions)); ep.add_action([2] * actions)
    c = ppo.collate([ep], "step", pol.device)
    pol.train_without_dropout()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = pol(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])
    del out
    by = {}
    for n, dt in kept.values():
        by[dt] = by.get(dt, 0) + n
    return by


def measure_saved(shape, dtype, device, T):
    """{(layers, tokens): {dtype: bytes}} saved for backward, 1 and 2 layers at T/2 and T tokens."""
    res = {}
    for layers in (1, 2):
        pol = shaped_policy(shape, layers, dtype, device)
        for t in (T // 2, T):
            res[layers, t] = saved_for_backward(pol, t, t // 4)
        del pol
    return res


def action_bytes(actions, per_action, vocab, hidden, itemsize):
    """What `actions` action tokens keep for backward: within one chunk of Policy's log-softmax, the
    measured per-token figure (its logits and log-softmax are kept); beyond one chunk every chunk is
    recomputed in backward, and a token keeps only its hidden state and its two indices."""
    import policy as P
    chunk = max(1, P.LOGIT_CHUNK_ELEMENTS // vocab)
    return per_action * actions if actions <= chunk else actions * (hidden * itemsize + 16)


def bench_memory(args, quiet=False):
    """Saved bytes per token per layer (2 layers minus 1) and per action token (the LM head), measured at
    two lengths; then the plan for the full shape: layers x tokens x per-layer + actions x per-action."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    T, N = args.tokens, args.tokens // 4
    res = measure_saved(args.shape, dtype, args.device or "cpu", T)
    tot = {k: sum(v.values()) for k, v in res.items()}
    layer_tok = (tot[2, T] - tot[1, T]) / T                                       # per token per layer
    layer_tok_half = (tot[2, T // 2] - tot[1, T // 2]) / (T // 2)
    fp32_layer_tok = (res[2, T].get("float32", 0) - res[1, T].get("float32", 0)) / T
    rest = tot[1, T] - layer_tok * T                                              # outside the layers
    rest_half = tot[1, T // 2] - layer_tok * (T // 2)
    per_action = (rest - rest_half) / (N - N // 2)                                # LM head + log-softmax at actions
    H, L, V = SHAPES[args.shape]["hidden_size"], SHAPES[args.shape]["num_hidden_layers"], SHAPES[args.shape]["vocab_size"]
    ep_tokens, ep_actions = args.plan_tokens, args.plan_actions
    acts = action_bytes(ep_actions, per_action, V, H, dtype.itemsize)
    plan = {"no_checkpointing_gb": (L * ep_tokens * layer_tok + acts) / 1e9,
            "checkpointing_gb": (L * ep_tokens * H * dtype.itemsize + ep_tokens * layer_tok
                                 + acts) / 1e9}   # layer inputs + one layer recomputed
    out = {"shape": args.shape, "dtype": args.dtype, "measured_tokens": [T // 2, T],
           "saved_bytes_per_token_per_layer": layer_tok, "at_half_length": layer_tok_half,
           "of_which_fp32_per_token_per_layer": fp32_layer_tok, "saved_bytes_per_action_token": per_action,
           "layers": L, "hidden": H, "vocab": V, "plan_tokens": ep_tokens, "plan_action_tokens": ep_actions, **plan}
    if quiet:
        return out
    print(f"{args.shape} ({args.dtype}, LoRA r 8 on every projection): {layer_tok / 1e3:.1f} KB saved per token per layer "
          f"({layer_tok_half / 1e3:.1f} KB at {T // 2} tokens; fp32 {fp32_layer_tok / 1e3:.1f} KB of it), "
          f"{per_action / 1e6:.2f} MB per action token (LM head)")
    print(f"plan for one {ep_tokens}-token episode with {ep_actions} action tokens, {L} layers: "
          f"{plan['no_checkpointing_gb']:.1f} GB without gradient checkpointing, {plan['checkpointing_gb']:.1f} GB with it")
    print(json.dumps(out))
    return out


# ---- the GPU check: a real shape's update and rollouts, beside the memory plan -------------------
# dense bf16 tensor-core peaks per GPU (vendor data sheets, TFLOP/s, without sparsity); the first name
# that occurs in torch.cuda.get_device_name() wins, so "H100 PCIe" is looked up before "H100"
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
               "L4": 121.0}


def peak_tflops(args, device, dtype):
    """(peak TFLOP/s, where it comes from): --peak-tflops, the table by GPU name, or on CPU a measured matmul."""
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in PEAK_TFLOPS.items():
            if k in name:
                return v, f"{name}: dense bf16 peak of its data sheet"
        return None, f"{name}: not in bench.PEAK_TFLOPS; give --peak-tflops for MFU"
    from harness.bench_trl import matmul_peak_gflops
    return matmul_peak_gflops(dtype=dtype, threads=args.threads, n=1024, reps=5) / 1e3, "a measured CPU matmul"


def synthetic_episode(tokens, actions, vocab, g, steps=4):
    """`tokens` random ids: a prompt, then `steps` x (action, observation), `actions` action tokens in all."""
    a = actions // steps
    obs = (tokens - actions) // (steps + 1)
    ep = rollout.Episode()
    ep.add_context(torch.randint(3, vocab, (tokens - actions - obs * steps,), generator=g).tolist())
    for _ in range(steps):
        ep.add_action(torch.randint(3, vocab, (a,), generator=g).tolist())
        ep.add_context(torch.randint(3, vocab, (obs,), generator=g).tolist())
    ep.rewards = [0.5] * steps
    return ep


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else _peak_rss_mib() * 2 ** 20 / 1e9


def gpu_check(args):
    """The update at mini-batch 1 and 2, without and with gradient checkpointing, and rollouts at batch
    8/16/32, on --shape with random weights; each figure printed and in the last JSON line."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    shape = SHAPES[args.shape]
    L = args.check_layers or shape["num_hidden_layers"]
    T, A, E = args.check_tokens, args.check_actions, args.check_episodes
    peak, peak_from = peak_tflops(args, device, dtype)
    # the plan's per-token figures, measured on this device (bench_memory), then scaled to L layers
    mem = bench_memory(argparse.Namespace(shape=args.shape, dtype=args.dtype, tokens=args.tokens, plan_tokens=T,
                                          plan_actions=A, threads=args.threads, device=str(device)), quiet=True)
    pol = shaped_policy(args.shape, L, dtype, device)
    frozen = sum(p.numel() * p.element_size() for p in pol.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in pol.parameters() if p.requires_grad)
    H, item = shape["hidden_size"], dtype.itemsize
    acts = action_bytes(A, mem["saved_bytes_per_action_token"], shape["vocab_size"], H, item)
    per_episode = {False: L * T * mem["saved_bytes_per_token_per_layer"] + acts,
                   True: L * T * H * item + T * mem["saved_bytes_per_token_per_layer"] + acts}
    print(f"gpu check: {args.shape} ({L} layers, {sum(p.numel() for p in pol.parameters()) / 1e6:,.1f} M params), "
          f"{args.dtype}, LoRA r 8 on every projection, on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"peak {peak if peak else float('nan'):.1f} TFLOP/s ({peak_from})")
    print(f"memory plan (README's method; its per-token figures measured here): {mem['saved_bytes_per_token_per_layer'] / 1e3:.1f} KB "
          f"saved per token per layer, {mem['saved_bytes_per_action_token'] / 1e6:.2f} MB per action token (README, on CPU "
          f"for qwen2-7b: 320.9 KB, 0.61 MB); plan = bf16 weights + LoRA x 16 B + mini-batch x one episode's activations")
    print(f"update: {E} episodes x {T} tokens ({A} action tokens each), {args.check_epochs} PPO epoch(s), "
          f"one optimizer step per epoch; median of {args.check_reps} after a warm-up")
    print(f"{'mini-batch':>10s} {'checkpointing':>13s} {'s/update':>9s} {'tokens/s':>9s} {'MFU':>6s} "
          f"{'peak memory GB':>15s} {'plan GB':>8s}")
    g = torch.Generator().manual_seed(0)
    episodes = [synthetic_episode(T, A, shape["vocab_size"], g) for _ in range(E)]
    runs_out = []
    for ckpt in (False, True):
        if ckpt:
            pol.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        for mbs in (1, 2):
            cfg = ppo.PPOConfig(batch_size=E, mini_batch_size=mbs, grad_accum=max(1, E // mbs), ppo_epochs=args.check_epochs)
            plan = (frozen + trainable * 16 + mbs * per_episode[ckpt]) / 1e9   # weights, LoRA + grad + Adam, activations
            rec = {"mini_batch": mbs, "gradient_checkpointing": ckpt, "plan_gb": plan}
            opt, kl = ppo.make_optimizer(pol, cfg), ppo.KLController(cfg)
            if device.type == "cuda":
                torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
            times = []
            try:
                for i in range(args.check_reps + 1):
                    eps = [rollout.Episode(e.ids, e.act, e.step, e.state_end, e.rewards) for e in episodes]
                    _sync(device); t0 = time.perf_counter()
                    ppo.update(pol, opt, eps, cfg, kl)
                    _sync(device)
                    if i:  # the first is a warm-up
                        times.append(time.perf_counter() - t0)
            except torch.OutOfMemoryError:
                rec.update(oom=True)
                print(f"{mbs:10d} {'on' if ckpt else 'off':>13s} {'OOM':>9s} {'':>9s} {'':>6s} {'':>15s} {plan:8.2f}")
                runs_out.append(rec)
                del opt
                pol.zero_grad(set_to_none=True)
                continue
            med = sorted(times)[len(times) // 2]
            flops = update_flops(pol.model.config, E * T, E * A, E * T * T, cfg)
            rec.update(oom=False, update_s=med, tokens_per_s=E * T / med, update_tflop=flops / 1e12,
                       mfu=flops / med / (peak * 1e12) if peak else None, peak_memory_gb=_peak_memory_gb(device))
            runs_out.append(rec)
            mfu = f"{rec['mfu']:.1%}" if rec["mfu"] is not None else "-"
            print(f"{mbs:10d} {'on' if ckpt else 'off':>13s} {med:9.2f} {rec['tokens_per_s']:9.0f} {mfu:>6s} "
                  f"{rec['peak_memory_gb']:15.2f} {plan:8.2f}")
            del opt
    pol.model.activation_checkpointing_disable()
    rolls = bench_generate(pol, args, device)
    agree = sampler_agreement(pol, args, device)
    out = {"check": "gpu", "shape": args.shape, "layers": L, "dtype": args.dtype, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "peak_tflops": peak, "peak_from": peak_from,
           "peak_memory_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS",
           "episode_tokens": T, "episode_action_tokens": A, "episodes": E, "ppo_epochs": args.check_epochs,
           "plan_bytes_per_token_per_layer": mem["saved_bytes_per_token_per_layer"],
           "plan_bytes_per_action_token": mem["saved_bytes_per_action_token"],
           "weights_gb": frozen / 1e9, "trainable_params": trainable, "update": runs_out, "rollouts": rolls,
           "agreement": agree}
    print(json.dumps(out))
    return out


def bench_generate(pol, args, device):
    """One sampled turn of --rollout-prompt-token prompts, --rollout-new tokens each, at each batch size:
    sampled tokens/s (prefill and decode included; a warm-up at the first size)."""
    V = SHAPES[args.shape]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    out = []
    for i, b in enumerate([args.rollout_batches[0]] + list(args.rollout_batches)):
        prompts = [torch.randint(3, V, (args.rollout_prompt,), generator=g).tolist() for _ in range(b)]
        gens = [rollout.episode_generator(0, 0, k) for k in range(b)]
        s0 = dict(pol.gen_stats)
        _sync(device); t0 = time.perf_counter()
        outs = rollout.generate(pol, prompts, args.rollout_new, 1.0, 1.0, gens)
        _sync(device); dt = time.perf_counter() - t0
        if i == 0:
            continue   # warm-up
        n = sum(map(len, outs))
        rec = {"batch": b, "sampled_tokens": n, "seconds": dt, "sampled_tokens_per_s": n / dt,
               "prefill_s": pol.gen_stats["prefill_s"] - s0["prefill_s"], "decode_s": pol.gen_stats["decode_s"] - s0["decode_s"]}
        out.append(rec)
        print(f"rollout batch {b:3d}: {n} sampled tokens in {dt:.2f} s = {n / dt:.0f} sampled tokens/s "
              f"(prefill {rec['prefill_s']:.2f} s of {b} x {args.rollout_prompt}-token prompts, decode {rec['decode_s']:.2f} s)")
    return out


@torch.no_grad()
def forward_logp(pol, prompts, outs):
    """PPO's forward log-probability of each sampled token (prompt i, then its sampled turn outs[i]):
    [sum of len(outs)] on the CPU, in the sampler's order."""
    eps = []
    for p, o in zip(prompts, outs):
        e = rollout.Episode(); e.add_context(p); e.add_action(o); eps.append(e)
    c = ppo.collate(eps, "step", pol.device)
    return pol(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])[0].float().cpu()


def sampler_agreement(pol, args, device, rows=4, prompt=256, new=64, lora_std=1e-3):
    """One policy, whatever the dtype: with a LoRA as after training (B of std `lora_std`), the
    log-probability the sampler gives each token it samples against the one PPO's forward gives it (the
    same token, the whole sequence at once); then pi_ref after freeze_reference against the policy it
    froze. Printed, and returned for the JSON line."""
    V = SHAPES[args.shape]["vocab_size"]
    g = torch.Generator().manual_seed(2)
    for m in pol.lora_modules():
        m.B.data = (torch.randn(m.B.shape, generator=g) * lora_std).to(m.B.device)
    prompts = [torch.randint(3, V, (prompt,), generator=g).tolist() for _ in range(rows)]
    outs, lps = rollout.generate(pol, prompts, new, 1.0, 1.0, [rollout.episode_generator(0, 0, k) for k in range(rows)],
                                 logprobs=True)
    logp = forward_logp(pol, prompts, outs)
    with pol.reference():
        ref = forward_logp(pol, prompts, outs)
    pol.freeze_reference()                      # the current policy becomes pi_ref (an SFT start's way)
    with pol.reference():
        frozen = forward_logp(pol, prompts, outs)
    sampled = torch.tensor([x for row in lps for x in row])
    gap, lora = (sampled - logp).abs(), (logp - ref).abs()
    out = {"tokens": len(sampled), "lora_std": lora_std, "sampler_vs_forward_max": gap.max().item(),
           "sampler_vs_forward_mean": gap.mean().item(), "lora_effect_mean": lora.mean().item(),
           "pi_ref_vs_frozen_policy_max": (frozen - logp).abs().max().item()}
    print(f"sampler vs PPO forward ({args.dtype}, LoRA B std {lora_std:g}): |log p difference| max "
          f"{out['sampler_vs_forward_max']:.4f}, mean {out['sampler_vs_forward_mean']:.5f} nats over {len(sampled)} sampled "
          f"tokens (the LoRA's own effect: mean {out['lora_effect_mean']:.4f}); pi_ref after freeze_reference vs "
          f"the policy it froze: max {out['pi_ref_vs_frozen_policy_max']:.2g}")
    return out


def bench_sampling(args):
    """How a bf16 policy samples, three ways, on --shape with a LoRA as after training (B of std 1e-3):
    the exact two-path sum (what rollout.generate does), a merged fp32 copy (W + (alpha / r) B A in fp32,
    computed in fp32: exact adapter, another rounding of everything else, twice the weights' memory) and
    a bf16 merge of W + B A (rounds most of a small B A away: what a sampler that merges would sample). For each: sampled tokens/s
    of one turn (median of --reps after a warm-up), the largest |log p| difference from PPO's forward of
    the bf16 policy over the sampled tokens, and the weight memory it adds."""
    import contextlib
    import copy
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or "cpu")
    shape = SHAPES[args.shape]
    pol = shaped_policy(args.shape, args.check_layers or shape["num_hidden_layers"], torch.bfloat16, device).eval()
    g = torch.Generator().manual_seed(2)
    for m in pol.lora_modules():
        m.B.data = (torch.randn(m.B.shape, generator=g) * 1e-3).to(m.B.device)
    prompts = [torch.randint(3, shape["vocab_size"], (args.rollout_prompt,), generator=g).tolist()
               for _ in range(args.rollout_batches[0])]
    fp32 = copy.deepcopy(pol)
    fp32.model.float(); fp32.compute_dtype = torch.float32

    @contextlib.contextmanager
    def bf16_merge():                                   # the sampler before: W + B A rounded to bf16
        for m in pol.lora_modules():
            m.merged = (m.base.weight.float() + m.delta()).to(m.base.weight.dtype)
        yield
        for m in pol.lora_modules():
            m.merged = None
    adapted = sum(m.base.weight.numel() for m in pol.lora_modules())
    weights = sum(p.numel() * p.element_size() for p in pol.model.parameters())
    ways = [("exact two-path (the sampler)", pol, contextlib.nullcontext, 0),
            ("merged fp32 copy", fp32, contextlib.nullcontext, weights),
            ("bf16 merge (the old sampler)", pol, bf16_merge, adapted * 2)]
    print(f"sampling a bf16 {args.shape} ({args.check_layers or shape['num_hidden_layers']} layers) with LoRA B std 1e-3 "
          f"on {device}: {len(prompts)} rows x {args.rollout_prompt}-token prompts, {args.rollout_new} new tokens")
    print(f"{'way':32s} {'sampled tokens/s':>16s} {'max |d log p| vs PPO forward':>29s} {'extra weights GB':>17s}")
    out = []
    for name, who, ctx, extra in ways:
        times = []
        for i in range(args.reps + 1):
            gens = [rollout.episode_generator(0, 0, k) for k in range(len(prompts))]
            with ctx():
                _sync(device); t0 = time.perf_counter()
                outs, lps = rollout.generate(who, prompts, args.rollout_new, 1.0, 1.0, gens, logprobs=True)
                _sync(device)
            if i:
                times.append(time.perf_counter() - t0)
        ref = forward_logp(pol, prompts, outs)
        n, med = sum(map(len, outs)), sorted(times)[len(times) // 2]
        gap = (torch.tensor([x for row in lps for x in row]) - ref).abs().max().item()
        out.append({"way": name, "sampled_tokens_per_s": n / med, "max_logp_gap": gap, "extra_weights_gb": extra / 1e9})
        print(f"{name:32s} {n / med:16.1f} {gap:29.4f} {extra / 1e9:17.3f}")
    print(json.dumps({"bench": "sampling", "shape": args.shape, "ways": out}))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--data", help="StepTool training TSV (PPO on its trajectories, paper config)")
    ap.add_argument("--max-tokens", type=int, default=1280, help="cut each TSV trajectory to its last N tokens")
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="timed rollout runs per mode (after one warm-up)")
    ap.add_argument("--rollouts", action=argparse.BooleanOptionalAction, default=True,
                    help="also time batched against one-at-a-time rollouts (the tiny model only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--advantage", default="step", choices=["step", "token"])
    ap.add_argument("--device")
    ap.add_argument("--compare-trl", metavar="PYTHON", help="also time trl 0.11.4 (bench_trl.py) with this interpreter, first")
    ap.add_argument("--memory", action="store_true", help="measure what a PPO forward saves for backward")
    ap.add_argument("--shape", default="qwen2-7b", choices=sorted(SHAPES), help="--memory: the model shape")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="--memory: weights and compute dtype")
    ap.add_argument("--tokens", type=int, default=256, help="--memory: measured episode length (and half of it)")
    ap.add_argument("--plan-tokens", type=int, default=4096, help="--memory: episode length of the plan")
    ap.add_argument("--plan-actions", type=int, default=1000, help="--memory: action tokens of the plan")
    ap.add_argument("--sampling", action="store_true", help="a bf16 policy's sampling three ways (--shape, "
                    "--check-layers, --rollout-*, --reps): speed, agreement with PPO's forward, memory")
    ap.add_argument("--gpu-check", action="store_true", help="the update and rollouts of --shape with random weights")
    ap.add_argument("--peak-tflops", type=float, help="--gpu-check: the device's peak for MFU (default: by GPU name)")
    ap.add_argument("--check-layers", type=int, default=0, help="--gpu-check: layers (0 = the shape's)")
    ap.add_argument("--check-tokens", type=int, default=4096, help="--gpu-check: tokens per episode")
    ap.add_argument("--check-actions", type=int, default=1000, help="--gpu-check: action tokens per episode")
    ap.add_argument("--check-episodes", type=int, default=4, help="--gpu-check: episodes per update")
    ap.add_argument("--check-epochs", type=int, default=1, help="--gpu-check: PPO epochs per update")
    ap.add_argument("--check-reps", type=int, default=2, help="--gpu-check: timed updates per configuration")
    ap.add_argument("--rollout-batches", type=int, nargs="+", default=[8, 16, 32], help="--gpu-check: rollout batch sizes")
    ap.add_argument("--rollout-prompt", type=int, default=512, help="--gpu-check: prompt tokens per rollout row")
    ap.add_argument("--rollout-new", type=int, default=128, help="--gpu-check: tokens sampled per row")
    a = ap.parse_args(argv)
    return gpu_check(a) if a.gpu_check else bench_sampling(a) if a.sampling else bench_memory(a) if a.memory else bench(a)


if __name__ == "__main__":
    main()
