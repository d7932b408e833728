"""bench.py's memory measurement, on a small shape: what a PPO forward keeps for backward (the README's
memory plan scales these figures to Qwen2-7B). No timing is asserted here."""
import json
import sys
import types

import pytest
import torch

from harness import bench


def test_saved_for_backward_holds_the_fp32_copies_of_every_lora_input_in_a_bf16_model():
    pol = bench.shaped_policy("small", 1, torch.bfloat16)
    one = bench.saved_for_backward(pol, 64, 16)
    pol2 = bench.shaped_policy("small", 2, torch.bfloat16)
    two = bench.saved_for_backward(pol2, 64, 16)
    H, I = bench.SHAPES["small"]["hidden_size"], bench.SHAPES["small"]["intermediate_size"]
    fp32_per_token_layer = (two["float32"] - one["float32"]) / 64
    # LoRA casts its input to fp32 in each of the 7 projections: q, k, v and gate, up read copies of H values,
    # o reads H and down reads I: (6 H + I) x 4 bytes per token and layer, on top of the bf16 activations
    assert fp32_per_token_layer >= (6 * H + I) * 4
    assert two["bfloat16"] > one["bfloat16"] > 0


def test_the_memory_benchmark_reports_every_figure_of_the_plan(capsys):
    import argparse
    a = argparse.Namespace(shape="small", dtype="bf16", tokens=64, plan_tokens=4096, plan_actions=1000, threads=1, device="cpu")
    out = bench.bench_memory(a)
    for k in ("saved_bytes_per_token_per_layer", "of_which_fp32_per_token_per_layer", "saved_bytes_per_action_token",
              "no_checkpointing_gb", "checkpointing_gb"):
        assert out[k] > 0, k
    assert out["checkpointing_gb"] < out["no_checkpointing_gb"]
    assert "GB without gradient checkpointing" in capsys.readouterr().out


def test_the_update_benchmark_reports_the_update_against_the_raw_passes(capsys, monkeypatch):
    import argparse
    monkeypatch.setattr(bench, "BENCH_TINY", dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128))
    a = argparse.Namespace(model="tiny", data=None, updates=1, threads=1, advantage="step", device="cpu",
                           compare_trl=None, max_tokens=1280, reps=1, rollouts=False)
    bench.bench(a)
    out = capsys.readouterr().out
    import json
    rec = json.loads(out.strip().splitlines()[-1])
    for k in ("update_s_median", "raw_forward_tokens_per_s", "raw_forward_backward_tokens_per_s", "update_vs_raw",
              "update_ideal_s"):
        assert rec[k] > 0, k
    assert rec["raw_forward_tokens_per_s"] > rec["raw_forward_backward_tokens_per_s"]
    assert "of raw" in out


def test_the_gpu_check_names_every_figure_on_a_small_shape_on_cpu(capsys):
    """bench.py --gpu-check, as it runs on a GPU, here on CPU: seconds per update, tokens/s,
    MFU and peak memory beside the plan, for mini-batch 1 and 2 without and with gradient checkpointing;
    sampled tokens/s of the rollouts at each batch size."""
    import json
    out = bench.main(["--gpu-check", "--device", "cpu", "--shape", "small", "--check-layers", "2", "--check-tokens", "128",
                      "--check-actions", "32", "--dtype", "fp32", "--peak-tflops", "0.1", "--rollout-batches", "2", "4",
                      "--rollout-prompt", "16", "--rollout-new", "4", "--check-reps", "1", "--threads", "1", "--tokens", "64"])
    text = capsys.readouterr().out
    rec = json.loads(text.strip().splitlines()[-1])
    assert [(u["mini_batch"], u["gradient_checkpointing"]) for u in rec["update"]] == [(1, False), (2, False), (1, True), (2, True)]
    for u in rec["update"]:
        for k in ("update_s", "tokens_per_s", "mfu", "peak_memory_gb", "plan_gb"):
            assert u[k] > 0, k
    assert [r["batch"] for r in rec["rollouts"]] == [2, 4] and all(r["sampled_tokens_per_s"] > 0 for r in rec["rollouts"])
    agree = rec["agreement"]                   # fp32 here: the sampler and the forward agree to rounding
    assert agree["tokens"] > 0 and agree["sampler_vs_forward_max"] < 1e-4 < agree["lora_effect_mean"]
    assert agree["pi_ref_vs_frozen_policy_max"] < 1e-4
    for words in ("s/update", "tokens/s", "MFU", "peak memory GB", "plan GB", "sampled tokens/s", "TFLOP/s",
                  "sampler vs PPO forward"):
        assert words in text, words
    assert out == rec


def test_the_sampling_benchmark_prints_each_ways_speed_agreement_and_memory(capsys):
    out = bench.main(["--sampling", "--shape", "small", "--check-layers", "2", "--rollout-batches", "2",
                      "--rollout-prompt", "16", "--rollout-new", "4", "--reps", "1", "--threads", "1"])
    assert [w["way"] for w in out][0].startswith("exact two-path")
    assert all(w["sampled_tokens_per_s"] > 0 and w["max_logp_gap"] >= 0 for w in out)
    assert out[0]["extra_weights_gb"] == 0 < out[1]["extra_weights_gb"]
    assert "max |d log p| vs PPO forward" in capsys.readouterr().out


def test_the_decode_benchmark_reports_both_samplers_against_the_bandwidth_limit(capsys):
    from harness import decode_bench
    rows = decode_bench.main(["--model", "tiny", "--batches", "1", "2", "--contexts", "16", "--new", "2",
                              "--bandwidth-mib", "8", "--threads", "1", "--dtypes", "float32", "bfloat16"])
    assert [(r["sampler"], r["dtype"], r["batch"]) for r in rows] == [
        (s, d, b) for b in (1, 2) for d in ("float32", "bfloat16") for s in ("ours", "transformers")]
    by = {(r["sampler"], r["dtype"], r["batch"]): r for r in rows}   # bf16 weights: fewer bytes a step
    assert by["ours", "bfloat16", 2]["gb_per_step"] < by["ours", "float32", 2]["gb_per_step"]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["limit_ms"] > 0 and r["gb_per_step"] > 0 and 0 < r["share_of_peak"]
        assert abs(r["tokens_per_s"] - r["batch"] * 1000 / r["ms_per_step"]) < 1e-6 * r["tokens_per_s"]
    out = capsys.readouterr().out
    assert "read bandwidth" in out and "% of limit" in out and '"read_bandwidth_gbs"' in out.strip().splitlines()[-1]
    peaks = json.loads(out.strip().splitlines()[-1])["matmul_peak_gflops"]    # each dtype against its own peak
    assert sorted(peaks) == ["bfloat16", "float32"] and all(g > 0 for g in peaks.values())


def test_a_decode_step_moves_every_weight_and_every_rows_keys_and_values():
    from harness import decode_bench
    from harness import models
    import policy as P
    model, tok = models.build_tiny(0, models.tiny_tokenizer())
    pol, c = P.Policy(model, tok, "tiny"), model.config
    kv = c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    one, two = decode_bench.step_bytes(pol, 1, 100), decode_bench.step_bytes(pol, 3, 100)
    assert two - one == 2 * 100 * kv and one - 100 * kv == sum(p.numel() * 4 for p in model.parameters())


def test_the_decode_benchmarks_llama_cpp_flag_says_what_it_needs_before_any_work(monkeypatch, capsys, tmp_path):
    from harness import decode_bench
    monkeypatch.setitem(sys.modules, "llama_cpp", None)                    # not installed: import fails
    with pytest.raises(SystemExit):
        decode_bench.main(["--model", "tiny", "--llama-cpp", "smollm2"])
    assert "--llama-cpp needs llama-cpp-python" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "llama_cpp", types.ModuleType("llama_cpp"))   # installed: the file is checked
    for name, why in ((str(tmp_path / "none.gguf"), "no such file"), ("qwen2", "nor one of smollm2")):
        with pytest.raises(SystemExit):
            decode_bench.main(["--model", "tiny", "--llama-cpp", name])
        assert why in capsys.readouterr().err
