"""Benchmarks of the PPO update, the rollouts and the memory a PPO forward keeps for backward.

    python bench.py                                    # update + rollouts, tiny model, fixed shapes
    python bench.py --model DIR --data FILE.tsv        # the update in the paper config on StepTool TSV trajectories
    python bench.py --model smollm2 --updates 1        # a real LM: the update against raw forward + backward
    python bench.py ... --compare-trl /path/to/python  # and trl 0.11.4's PPOTrainer.step on the same data, first
    python bench.py --memory [--shape qwen2-7b]        # bytes saved for backward per token and layer
    python ppo.py --bench ...                          # the same as python bench.py ...

Figures are printed (one JSON object last); the README quotes them with the machine named. Speed
is never asserted in tests, only that each figure is produced.
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
    import policy as P
    trl = compare_trl(args) if args.compare_trl else None   # trl first, then ours, in one command
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    pol = P.load_policy(args.model, device=args.device, lora_r=8, lora_alpha=16, lora_dropout=0.0, tiny=BENCH_TINY)
    cfg = ppo.PPOConfig(advantage=args.advantage)
    if args.data:
        import reward
        rows = reward.read_tsv(args.data)
        all_eps, dropped = ppo.episodes_from_rows(pol, rows, max_tokens=args.max_tokens)
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
        from bench_trl import matmul_peak_gflops
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
        sys.exit(f"ppo.py --compare-trl: bench_trl.py failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_rollouts(pol, args):
    """16 episodes batched vs one at a time, on the embedded server (tiny random model: long, wrong turns).
    The two modes alternate, --reps times each after a warm-up; medians and the ratio of medians."""
    import env
    import server
    srv = server.start_in_thread()
    try:
        client = env.ToolClient(srv.url)
        tasks = env.load_tasks(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bench_test.json"))[:16]
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
SHAPES = {  # model shapes built from their config with random weights (no download)
    "qwen2-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                     num_key_value_heads=4, num_hidden_layers=28, tie_word_embeddings=False),
    "small": dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=28, tie_word_embeddings=False),
}


def shaped_policy(shape, layers, dtype, device="cpu", lora_r=8):
    """A random Qwen2 of a named shape with `layers` layers, LoRA on every projection (load_policy's way)."""
    import chat
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
                                  eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=chat.CHAT_TEMPLATE)
    return P.Policy(model, tok, "tiny", dict(r=lora_r, alpha=2 * lora_r, dropout=0.0, targets=list(P.LORA_TARGETS)))


def saved_for_backward(pol, tokens, actions):
    """Bytes autograd keeps for backward in one PPO forward of one episode of `tokens` tokens whose last
    `actions` are action tokens: {dtype: bytes}, each storage once, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in pol.parameters()}
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


def bench_memory(args):
    """Saved bytes per token per layer (2 layers minus 1) and per action token (the LM head), measured at
    two lengths; then the plan for the full shape: layers x tokens x per-layer + actions x per-action."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    T, N = args.tokens, args.tokens // 4
    res = {}
    for layers in (1, 2):
        pol = shaped_policy(args.shape, layers, dtype, args.device or "cpu")
        for t in (T // 2, T):
            res[layers, t] = saved_for_backward(pol, t, t // 4)
        del pol
    tot = {k: sum(v.values()) for k, v in res.items()}
    layer_tok = (tot[2, T] - tot[1, T]) / T                                       # per token per layer
    layer_tok_half = (tot[2, T // 2] - tot[1, T // 2]) / (T // 2)
    fp32_layer_tok = (res[2, T].get("float32", 0) - res[1, T].get("float32", 0)) / T
    rest = tot[1, T] - layer_tok * T                                              # outside the layers
    rest_half = tot[1, T // 2] - layer_tok * (T // 2)
    per_action = (rest - rest_half) / (N - N // 2)                                # LM head + log-softmax at actions
    H, L, V = SHAPES[args.shape]["hidden_size"], SHAPES[args.shape]["num_hidden_layers"], SHAPES[args.shape]["vocab_size"]
    ep_tokens, ep_actions = args.plan_tokens, args.plan_actions
    plan = {"no_checkpointing_gb": (L * ep_tokens * layer_tok + ep_actions * per_action) / 1e9,
            "checkpointing_gb": (L * ep_tokens * H * dtype.itemsize + ep_tokens * layer_tok
                                 + ep_actions * per_action) / 1e9}   # layer inputs + one layer recomputed
    out = {"shape": args.shape, "dtype": args.dtype, "measured_tokens": [T // 2, T],
           "saved_bytes_per_token_per_layer": layer_tok, "at_half_length": layer_tok_half,
           "of_which_fp32_per_token_per_layer": fp32_layer_tok, "saved_bytes_per_action_token": per_action,
           "layers": L, "hidden": H, "vocab": V, "plan_tokens": ep_tokens, "plan_action_tokens": ep_actions, **plan}
    print(f"{args.shape} ({args.dtype}, LoRA r 8 on every projection): {layer_tok / 1e3:.1f} KB saved per token per layer "
          f"({layer_tok_half / 1e3:.1f} KB at {T // 2} tokens; fp32 {fp32_layer_tok / 1e3:.1f} KB of it), "
          f"{per_action / 1e6:.2f} MB per action token (LM head)")
    print(f"plan for one {ep_tokens}-token episode with {ep_actions} action tokens, {L} layers: "
          f"{plan['no_checkpointing_gb']:.1f} GB without gradient checkpointing, {plan['checkpointing_gb']:.1f} GB with it")
    print(json.dumps(out))
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
    a = ap.parse_args(argv)
    bench_memory(a) if a.memory else bench(a)


if __name__ == "__main__":
    main()
