"""Baseline for the PPO-update benchmark: trl 0.11.4 ``PPOTrainer.step`` on CPU.

The original StepTool code subclasses trl 0.10/0.11's PPOTrainer and calls
``.step(queries, responses, scores)`` once per batch of 8 trajectories.  This times
exactly that call on a tiny random-init Qwen2 (~5 M params) + LoRA, fp32, CPU, with
the paper's PPO hyper-parameters, for comparison with the project's own update.
trl 0.11.4 needs transformers 4.46, so it runs in its own virtualenv (``rich``: trl
imports it, newer tyro no longer pulls it in):

    python3 -m venv /work/trlenv
    /work/trlenv/bin/pip install torch==2.13.0        # the CPU wheel in /opt/wheels
    /work/trlenv/bin/pip install transformers==4.46.3 trl==0.11.4 peft==0.13.2 \
        accelerate==1.1.1 tokenizers==0.20.3 datasets==3.1.0 rich

    # tiny Qwen2 + byte-level BPE tokenizer trained on the TSV text (the trainer runs
    # out of merges at ~3.2 k of the 4096 asked; model vocab stays 4096). Loads
    # identically in transformers 4.46 and 5.x, whichever of the two made it.
    python harness/bench_trl.py make-model --tsv DATA.tsv --out /work/bench_model
    # 1 warm-up update, then N timed ones
    /work/trlenv/bin/python harness/bench_trl.py trl --model /work/bench_model --data DATA.tsv
    python harness/bench_trl.py matmul                        # fp32 matmul peak, 2 threads

Per update: wall seconds, real (non-pad) tokens of the 8 trajectories, real tokens/s,
the padding fraction of what trl actually runs forward on (it pads all 8 to the
longest, then slices mini-batches), peak RSS, and the CPUs *other* processes used
meanwhile: on a 2-core box any concurrent job slows a 2-thread run several-fold, so
only runs with other_jobs_cpu ~0 count.  Last line: JSON summary
(update_tokens_per_s = all timed tokens / all timed seconds).
"""
import argparse
import ast
import csv
import json
import os
import re
import resource
import statistics
import time
import warnings

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
MAX_TOKENS = 1280   # each trajectory is cut to its last 1280 tokens
MIN_QUERY = 16      # query tokens kept when the response alone is too long


def matmul_peak_gflops(dtype=torch.float32, threads=2, n=2048, reps=20):
    """Median GFLOP/s of an n x n @ n x n matmul with `threads` intra-op threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(5):   # warm-up (thread pool, clocks)
            a @ b
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return 2 * n ** 3 / statistics.median(times) / 1e9
    finally:
        torch.set_num_threads(old)


def busy_cpu_s():   # system-wide busy CPU seconds (to spot other jobs on the box)
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")   # minus idle, iowait


def read_tsv(path):
    """Rows of (prompts, responses, rewards): Python-literal lists per cell."""
    csv.field_size_limit(1 << 30)
    with open(path, newline="") as f:
        return [(ast.literal_eval(r["prompt"]), ast.literal_eval(r["response"]),
                 ast.literal_eval(r["reward"])) for r in csv.DictReader(f, delimiter="\t")]


# ----------------------------------------------------------------- make-model
def make_model(tsv, out):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    split = re.compile("|".join(re.escape(s) for s in SPECIALS))
    texts = [piece for p, r, _ in read_tsv(tsv) for s in list(p) + list(r)
             for piece in split.split(s) if piece]
    # exactly Qwen2's pipeline: transformers 5.x's Qwen2Tokenizer rebuilds it from
    # vocab+merges (ignoring tokenizer.json's), 4.46 reads tokenizer.json verbatim
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=4096, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", model_max_length=4096)
    tok.save_pretrained(out)
    # transformers 5.x writes tokenizer_class "TokenizersBackend" (unknown to 4.46) and
    # chat_template.jinja; write one tokenizer_config.json both versions read alike
    specials = {str(tok.convert_tokens_to_ids(t)): dict(
        content=t, lstrip=False, normalized=False, rstrip=False, single_word=False,
        special=True) for t in SPECIALS}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", eos_token="<|im_end|>",
                       pad_token="<|endoftext|>", model_max_length=4096,
                       clean_up_tokenization_spaces=False, added_tokens_decoder=specials,
                       chat_template=CHAT_TEMPLATE), f, indent=2)
    if os.path.exists(jinja := os.path.join(out, "chat_template.jinja")):
        os.remove(jinja)

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=688, vocab_size=4096,
                      max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).float()
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {out}: {n / 1e6:.3f} M params ({n}), tokenizer vocab {len(tok)}")


# ------------------------------------------------------------------------ trl
def build_samples(tok, rows):
    """One (query, response, score) per trajectory, cut to its last MAX_TOKENS."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    out = []
    for prompts, responses, rewards in rows:
        q, r = enc(prompts[0]), []
        for k, resp in enumerate(responses):   # prompts[k] follows responses[k-1]
            r += (enc(prompts[k]) if k else []) + enc(resp)
        if len(q) + len(r) > MAX_TOKENS:
            if len(r) > MAX_TOKENS - MIN_QUERY:
                q, r = q[-MIN_QUERY:], r[-(MAX_TOKENS - MIN_QUERY):]
            else:
                q = q[-(MAX_TOKENS - len(r)):]
        out.append((torch.tensor(q), torch.tensor(r), torch.tensor(float(rewards[-1]))))
    return out


def run_trl(model_dir, data, updates, threads, batch_size=8):
    import trl
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore", category=FutureWarning)   # "PPOTrainer is deprecated"
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    samples = build_samples(tok, read_tsv(data))
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                      "gate_proj", "up_proj", "down_proj"])
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        model_dir, peft_config=lora, torch_dtype=torch.float32)
    config = PPOConfig(learning_rate=1e-5, batch_size=batch_size, mini_batch_size=2,
                       gradient_accumulation_steps=4, ppo_epochs=4, init_kl_coef=0.3,
                       adap_kl_ctrl=True, target=6, horizon=10000, gamma=0.99, lam=0.95,
                       cliprange=0.2, cliprange_value=0.2, seed=0)
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tok)

    # padding actually computed on: every forward pass trl runs (policy, reference,
    # and the ppo_epochs x mini-batch training passes) gets its attention mask here
    pad, inner = {"total": 0, "real": 0}, trainer.batched_forward_pass

    def counting_forward(model, queries, responses, model_inputs, *a, **kw):
        mask = model_inputs["attention_mask"]
        pad["total"], pad["real"] = pad["total"] + mask.numel(), pad["real"] + int(mask.sum())
        return inner(model, queries, responses, model_inputs, *a, **kw)

    trainer.batched_forward_pass = counting_forward

    results = []
    for u in range(updates + 1):
        batch = [samples[(u * batch_size + i) % len(samples)] for i in range(batch_size)]
        qs, rs, scores = (list(x) for x in zip(*batch))
        pad["total"] = pad["real"] = 0
        cpu0, busy0, t = time.process_time(), busy_cpu_s(), time.perf_counter()
        stats = trainer.step(qs, rs, scores)
        dt = time.perf_counter() - t
        cpu_util = (time.process_time() - cpu0) / dt   # ~threads if the CPU is not shared
        other = max(0.0, busy_cpu_s() - busy0 - (time.process_time() - cpu0)) / dt
        toks = sum(lens := [len(q) + len(r) for q, r, _ in batch])
        rec = dict(seconds=dt, tokens=toks, pad_fraction=1 - pad["real"] / pad["total"],
                   cpu_util=cpu_util, other_cpu=other, fwd_s=stats["time/ppo/forward_pass"],
                   opt_s=stats["time/ppo/optimize_step"],
                   peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        tag = "warm-up" if u == 0 else f"update {u}/{updates}"
        print(f"{tag}: {dt:.2f} s, {toks} real tokens (max len {max(lens)}), {toks / dt:.0f} "
              f"tok/s, pad {rec['pad_fraction']:.1%} [fwd {rec['fwd_s']:.1f} s, ppo epochs "
              f"{rec['opt_s']:.1f} s; CPUs: ours {cpu_util:.2f}, other jobs {other:.2f}], "
              f"peak RSS {rec['peak_rss_mib']:.0f} MiB", flush=True)
        if u > 0:
            results.append(rec)

    med = lambda k: statistics.median(r[k] for r in results)
    summary = {
        "impl": f"trl-{trl.__version__}", "update_s_median": round(med("seconds"), 3),
        "update_tokens_per_s": round(sum(r["tokens"] for r in results)
                                     / sum(r["seconds"] for r in results), 1),
        "tokens_per_update": med("tokens"), "pad_fraction": round(med("pad_fraction"), 4),
        "peak_rss_mib": round(max(r["peak_rss_mib"] for r in results), 1),
        "threads": threads, "cpu_util": round(med("cpu_util"), 2),
        "other_jobs_cpu": round(max(r["other_cpu"] for r in results), 2),
        "updates": updates, "batch_size": batch_size, "torch": torch.__version__,
        "update_s": [round(r["seconds"], 3) for r in results]}
    if summary["other_jobs_cpu"] > 0.1:
        print("WARNING: other processes used CPU during timing; rerun on a quiet machine")
    print(json.dumps(summary))
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model", help="build the tiny Qwen2 + tokenizer")
    for flag in ("--tsv", "--out"):
        m.add_argument(flag, required=True)
    t = sub.add_parser("trl", help="time trl PPOTrainer.step")
    for flag in ("--model", "--data"):
        t.add_argument(flag, required=True)
    t.add_argument("--updates", type=int, default=3)
    t.add_argument("--threads", type=int, default=2)
    sub.add_parser("matmul", help="print fp32 matmul peak GFLOP/s (2 threads)")
    a = ap.parse_args()
    if a.cmd == "make-model":
        make_model(a.tsv, a.out)
    elif a.cmd == "trl":
        run_trl(a.model, a.data, a.updates, a.threads)
    else:
        print(f"{matmul_peak_gflops():.1f} GFLOP/s")


if __name__ == "__main__":
    main()
