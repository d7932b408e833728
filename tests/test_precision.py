"""One policy whatever the dtype: in bf16 the rollouts sample, and pi_ref is, exactly the policy PPO's
forward computes; the log-probs apply the model's own logit post-processing; the vocabulary-wide
log-softmax runs in chunks. CPU, bf16 where it matters (the dtype of the 7B GPU path)."""
import copy

import pytest
import torch

import policy as P
import ppo
import rollout
from conftest import SMALL
from harness import models
from harness import toolclient

BF16 = torch.bfloat16


def bf16_policy(tiny_tok, seed=0, **size):
    """A random Qwen2 with bf16 weights and fp32 LoRA (r 4), built as load_policy builds one on a GPU."""
    model, tok = models.build_tiny(seed, tok=tiny_tok, **{**SMALL, **size})
    model.to(BF16)
    model.config.use_cache = False
    model.requires_grad_(False)
    P.inject_lora(model, 4, 8, 0.0)
    return P.Policy(model, tok, "tiny", dict(r=4, alpha=8, dropout=0.0, targets=list(P.LORA_TARGETS)))


def episode(prompt, action):
    ep = rollout.Episode()
    ep.add_context(prompt); ep.add_action(action)
    return ep


def log_probs(pol, eps):
    c = ppo.collate(eps, "step", pol.device)
    with torch.no_grad():
        return pol(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])[0]


def train_a_few_steps(pol, steps=3, lr=3e-4):
    """A few Adam steps of SFT on one random episode: a small, trained (not random) LoRA update."""
    g = torch.Generator().manual_seed(1)
    ep = episode(torch.randint(3, 2000, (20,), generator=g).tolist(), torch.randint(3, 2000, (30,), generator=g).tolist())
    opt = torch.optim.Adam([p for p in pol.parameters() if p.requires_grad], lr=lr)
    pol.train_without_dropout()
    for _ in range(steps):
        c = ppo.collate([ep], "step", pol.device)
        logp, _, _ = pol(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])
        opt.zero_grad(); (-logp.mean()).backward(); opt.step()
    return pol.eval()


def sample_with_log_probs(pol, n=6, new=24):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 2000, (10 + 3 * i,), generator=g).tolist() for i in range(n)]
    outs, lps = rollout.generate(pol, prompts, new, 1.0, 1.0, [torch.Generator().manual_seed(i) for i in range(n)], logprobs=True)
    return [episode(p, o) for p, o in zip(prompts, outs)], torch.tensor([x for row in lps for x in row])


# ---- the sampler samples the policy that PPO trains --------------------------------------------
# bf16 noise: the sampler (KV cache, one token at a time, left-padded batch) and the forward (whole
# sequences) run different kernels, and each rounds its residual stream and logits to bf16's 8-bit
# mantissa: their log-probs of the same token differed by up to 0.008 nats here (hidden 64 to 1,024,
# 2-core Xeon), against 1e-6 in fp32. 0.03 is ~4x that.
BF16_LOGP_TOL = 0.03


def test_in_bf16_the_sampler_assigns_each_sampled_token_the_log_prob_ppos_forward_gives_it(tiny_tok):
    pol = train_a_few_steps(bf16_policy(tiny_tok, hidden_size=256, intermediate_size=512))
    eps, sampled = sample_with_log_probs(pol)
    forward = log_probs(pol, eps)
    assert (sampled - forward).abs().max() <= BF16_LOGP_TOL
    with pol.reference():                                   # the update is there to be seen
        assert (log_probs(pol, eps) - forward).abs().max() > 0.01


def test_under_bf16_autocast_the_sampler_and_the_forward_agree_too(tiny_tok):
    """Full fine-tuning in bf16 (--dtype bfloat16 on the tiny model, or a GPU): fp32 master weights, bf16
    compute under autocast, where rotary embedding leaves keys fp32 and values bf16: the sampler's cache
    keeps each in its own dtype, as the forward has them."""
    model, tok = models.build_tiny(0, tok=tiny_tok, **{**SMALL, "hidden_size": 256, "intermediate_size": 512})
    model.config.use_cache = False
    pol = train_a_few_steps(P.Policy(model, tok, "tiny", full_finetune=True, compute_dtype=BF16))
    eps, sampled = sample_with_log_probs(pol)
    forward = log_probs(pol, eps)
    assert (sampled - forward).abs().max() <= BF16_LOGP_TOL
    with torch.no_grad(), pol.autocast():
        assert pol.model.model.layers[0].mlp.up_proj(torch.ones(1, 256)).dtype == BF16   # the products in bf16


def test_in_fp32_the_sampler_and_the_forward_agree_to_rounding(make_policy):
    pol = train_a_few_steps(make_policy())
    eps, sampled = sample_with_log_probs(pol)
    torch.testing.assert_close(sampled, log_probs(pol, eps), atol=1e-5, rtol=0)


def test_sampling_a_bf16_policy_computes_each_projection_exactly_as_ppos_forward(tiny_tok):
    """At a 7B-like width with a small update (B of std 1e-4, a few small Adam steps), W + B A merged
    in bf16 keeps almost none of B A: sampling would draw from pi_ref plus rounding noise. Sampling
    must compute what the two-path forward computes, bit for bit, and copy no weight. (The two-path sum
    itself is rounded to bf16 after the adapter's fp32 part is added: that is the policy PPO trains.)"""
    pol = bf16_policy(tiny_tok, hidden_size=1024, intermediate_size=1024, num_hidden_layers=1).eval()
    g = torch.Generator().manual_seed(3)
    for m in pol.lora_modules():
        m.B.data = torch.randn(m.B.shape, generator=g) * 1e-4
    x = torch.randn(5, 1024, generator=g).to(BF16)
    mods = [m for m in pol.lora_modules() if m.base.in_features == 1024]
    with torch.no_grad():
        two_paths = [m(x) for m in mods]
        with rollout.merged_lora(pol):
            sampled = [m(x) for m in mods]
            assert all(m.merged is None for m in mods)         # no merged copy of any bf16 weight
    assert all(torch.equal(s, t) for s, t in zip(sampled, two_paths))


def test_freeze_reference_in_bf16_makes_pi_ref_exactly_the_sft_policy(tiny_tok):
    pol = train_a_few_steps(bf16_policy(tiny_tok, hidden_size=256, intermediate_size=512), lr=1e-4)
    eps = [episode(list(range(3, 30)), list(range(40, 60))), episode(list(range(7, 19)), list(range(90, 97)))]
    sft = log_probs(pol, eps)
    base = {n: p.clone() for n, p in pol.named_parameters() if not p.requires_grad}
    pol.freeze_reference()
    with pol.reference():
        assert torch.equal(log_probs(pol, eps), sft)         # pi_ref is the SFT policy, bit for bit
    assert torch.equal(log_probs(pol, eps), sft)             # and so is pi_theta at PPO's start
    assert all(torch.equal(base[n], p) for n, p in pol.named_parameters() if not p.requires_grad)  # no bf16 merge
    assert all(not m.B.any() for m in pol.lora_modules())   # the trainable adapter restarts at 0


def test_a_second_freeze_stacks_adapters_exactly_and_a_checkpoint_restores_them(tiny_tok, tmp_path):
    pol = train_a_few_steps(bf16_policy(tiny_tok), lr=1e-3)
    pol.freeze_reference()
    train_a_few_steps(pol, lr=1e-3)
    eps = [episode(list(range(3, 30)), list(range(40, 60)))]
    before = log_probs(pol, eps)
    pol.freeze_reference()
    assert all(m.A0.shape[0] == 8 for m in pol.lora_modules())   # rank 4 + 4, frozen
    with pol.reference():
        torch.testing.assert_close(log_probs(pol, eps), before, atol=1e-2, rtol=0)
    models.save_policy(pol, str(tmp_path / "ck"))
    back = models.load_policy(str(tmp_path / "ck"), device="cpu")
    assert back.compute_dtype == BF16 and all(m.A0.shape[0] == 8 for m in back.lora_modules())
    with pol.reference(), back.reference():
        assert torch.equal(log_probs(back, eps), log_probs(pol, eps))


def test_an_adapter_chain_in_bf16_puts_the_start_under_the_trained_adapter_exactly(tiny_tok, tmp_path):
    pol = train_a_few_steps(bf16_policy(tiny_tok), lr=1e-3)
    models.save_adapter(pol, str(tmp_path / "sft.safetensors"))
    pol.freeze_reference()
    train_a_few_steps(pol, lr=1e-3)
    models.save_adapter(pol, str(tmp_path / "rl.safetensors"))
    eps = [episode(list(range(3, 30)), list(range(40, 60)))]
    other = bf16_policy(tiny_tok)
    models.load_adapter(other, str(tmp_path / "sft.safetensors"), merge=True)
    models.load_adapter(other, str(tmp_path / "rl.safetensors"))
    assert torch.equal(log_probs(other.eval(), eps), log_probs(pol, eps))


def test_export_merged_in_bf16_says_how_much_of_the_adapter_rounding_took(tiny_tok, tmp_path):
    import json
    pol = bf16_policy(tiny_tok, hidden_size=1024, intermediate_size=1024, num_hidden_layers=1)
    g = torch.Generator().manual_seed(3)
    for m in pol.lora_modules():
        m.B.data = torch.randn(m.B.shape, generator=g) * 1e-4
    models.export_merged(pol, str(tmp_path / "m"))
    info = json.load(open(tmp_path / "m" / "merge.json"))
    assert info["merged_in"] == "float32" and info["stored_as"] == "bfloat16"
    assert info["adapter_change_rounded_away"] > 0.5          # most of a small update does not survive bf16
    fp32 = copy.deepcopy(pol).float()
    fp32.compute_dtype = torch.float32
    models.export_merged(fp32, str(tmp_path / "f"))
    assert json.load(open(tmp_path / "f" / "merge.json"))["adapter_change_rounded_away"] < 1e-3


# ---- logits as the model computes them ------------------------------------------------------------
def tiny_arch(kind):
    """A random Gemma2 (final-logit soft-capping) or Cohere (logit_scale) built from a config, no download."""
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    cfg = (Gemma2Config(**common, final_logit_softcapping=2.0, attn_logit_softcapping=None, query_pre_attn_scalar=8)
           if kind == "gemma2" else CohereConfig(**common, logit_scale=0.25))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():                              # logits large enough that capping and scaling bite
        model.get_output_embeddings().weight.mul_(40.0)
    return model


@pytest.mark.parametrize("kind", ["gemma2", "cohere"])
def test_ppo_log_probs_apply_the_models_own_logit_processing(tiny_tok, kind):
    model = tiny_arch(kind).eval()
    pol = P.Policy(model, tiny_tok, "tiny", None)
    ids = [5, 17, 3, 44, 9, 61, 2, 30]
    eps = [episode(ids[:3], ids[3:])]
    with torch.no_grad():
        own = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    want = own[torch.arange(2, len(ids) - 1), torch.tensor(ids[3:])]
    torch.testing.assert_close(log_probs(pol, eps), want, atol=1e-5, rtol=0)
    models.check_logits(pol)


def test_a_model_whose_logits_policy_cannot_reproduce_is_refused_at_load(tiny_tok):
    model = tiny_arch("cohere")                 # a forward that also halves its logits, which Policy.logits cannot know
    model.forward = (lambda f: lambda *a, **k: type("O", (), {"logits": f(*a, **k).logits * 0.5})())(model.forward)
    with pytest.raises(ValueError, match="differs from the model's own logits"):
        models.check_logits(P.Policy(model, tiny_tok, "tiny", None))


# ---- the vocabulary-wide log-softmax in chunks --------------------------------------------------------
def test_chunked_log_softmax_gives_the_same_log_probs_entropies_and_gradients(make_policy, monkeypatch):
    def run(chunk):
        monkeypatch.setattr(P, "LOGIT_CHUNK_ELEMENTS", chunk)
        torch.manual_seed(0)                                   # LoRA's A
        pol = make_policy(seed=4).eval()
        for m in pol.lora_modules():
            m.B.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        c = ppo.collate([episode(list(range(3, 40)), list(range(50, 90)))], "step", pol.device)
        logp, V, ent = pol(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"], entropy=True)
        (logp.sum() + ent.sum() + V.sum()).backward()
        return logp.detach(), ent.detach(), [p.grad.clone() for p in pol.parameters() if p.requires_grad]
    whole, chunked = run(1 << 30), run(7 * len(make_policy().tok))     # one chunk; 7 tokens a chunk
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked[1], whole[1], atol=1e-5, rtol=0)
    for a, b in zip(chunked[2], whole[2]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_memory_kept_for_backward_does_not_grow_with_the_vocabulary_per_action_token(make_policy, monkeypatch):
    monkeypatch.setattr(P, "LOGIT_CHUNK_ELEMENTS", 16 * 2048, raising=False)
    pol = make_policy().eval()
    V = pol.model.get_output_embeddings().weight.shape[0]

    def saved_bytes(actions):
        params, kept = {p.untyped_storage().data_ptr() for p in pol.parameters()}, {}
        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        c = ppo.collate([episode([5] * (420 - actions), [7] * actions)], "step", pol.device)   # 420 tokens
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pol(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])
        return sum(kept.values())
    per_action = (saved_bytes(400) - saved_bytes(200)) / 200     # the same sequence, 200 more action tokens
    assert per_action < V                       # unchunked: 2 x V x 4 bytes (logits and log-softmax) per token


def test_an_fp32_rollout_merges_each_adapter_once_per_batch_not_once_per_turn(make_policy, tool_server, test_tasks,
                                                                              monkeypatch):
    import env
    pol = make_policy().eval()
    for m in pol.lora_modules():
        m.B.data.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
    merges, real_delta = [], P.LoRALinear.delta
    monkeypatch.setattr(P.LoRALinear, "delta", lambda self: merges.append(1) or real_delta(self))
    eps, _ = rollout.rollout(pol, test_tasks[:3], toolclient.ToolClient(tool_server.url), max_steps=3, max_new_tokens=8)
    assert max(e.n_steps for e in eps) >= 2 and len(merges) == len(pol.lora_modules())
