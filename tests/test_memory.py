"""memory.py: the run's memory plan picks gradient checkpointing and the micro-batches that fit the
device, measured on the loaded model; a flag given on the command line is never changed."""
import os
import types

import pytest
import torch

from harness import memory
import policy as P
from conftest import SMALL


def config(**kw):
    return types.SimpleNamespace(**{**dict(max_context=4096, episodes_per_iteration=8, sft_epochs=1, data="",
                                           mini_batch_size=2, sft_micro_batch_size=4, grad_accum=4,
                                           gradient_checkpointing=None), **kw})


def test_what_an_episode_keeps_for_backward_grows_with_its_length_and_checkpointing_keeps_less(make_policy):
    pol = make_policy()
    off, on = zip(*((e[False], e[True]) for e in (memory.episode_bytes(pol, t) for t in (256, 512))))
    assert off[1] > off[0] > 0 and on[1] > on[0] > 0
    assert on[1] < off[1]
    assert not pol.model.is_activation_checkpointing and pol.training      # left as it was


@pytest.mark.parametrize("device_gb, want", [   # an episode keeps 18 GB, 2 GB with checkpointing; FIT 0.9
    (1000, (False, 2, 4, 4)),    # everything fits without checkpointing
    (70, (False, 2, 3, 4)),      # SFT's micro-batch of 4 would not (72 GB of 63): 3
    (30, (False, 1, 1, 8)),      # only one episode at a time: mini-batch 1, the same 8 episodes per optimizer step
    (10, (True, 2, 4, 4)),       # not even one without checkpointing: on, and the micro-batches as configured
    (5, (True, 2, 2, 4)),
    (3, (True, 1, 1, 8)),
])
def test_the_plan_turns_checkpointing_on_or_shrinks_micro_batches_only_as_far_as_needed(make_policy, monkeypatch,
                                                                                       device_gb, want):
    pol = make_policy()
    monkeypatch.setattr(memory, "episode_bytes", lambda p, T: {True: 2e9, False: 18e9})
    monkeypatch.setattr(memory, "device_bytes", lambda dev: device_gb * 1e9)
    monkeypatch.setattr(memory, "kv_bytes", lambda p, n, T: 1e9)
    cfg, lines = config(), []
    plan = memory.plan(pol, cfg, given=(), log=lines.append)
    assert (cfg.gradient_checkpointing, cfg.mini_batch_size, cfg.sft_micro_batch_size, cfg.grad_accum) == want
    assert plan["fits"] and plan["need"] <= memory.FIT * device_gb * 1e9
    assert pol.model.is_activation_checkpointing == want[0]
    assert len(lines) == 1 and ("gradient checkpointing on" if want[0] else "gradient checkpointing off") in lines[0]


def test_flags_given_on_the_command_line_are_kept_and_a_plan_that_cannot_fit_says_so(make_policy, monkeypatch):
    pol = make_policy()
    monkeypatch.setattr(memory, "episode_bytes", lambda p, T: {True: 2e9, False: 18e9})
    monkeypatch.setattr(memory, "device_bytes", lambda dev: 30e9)
    monkeypatch.setattr(memory, "kv_bytes", lambda p, n, T: 1e9)
    cfg, lines = config(gradient_checkpointing=False, mini_batch_size=2), []
    plan = memory.plan(pol, cfg, given=("gradient_checkpointing", "mini_batch_size"), log=lines.append)
    assert not cfg.gradient_checkpointing and cfg.mini_batch_size == 2 and cfg.grad_accum == 4
    assert not plan["fits"] and "expect out-of-memory" in lines[0]


def test_qwen2_7b_at_the_papers_batch_and_4096_tokens_fits_one_80_gb_gpu_by_default(make_policy, monkeypatch):
    """The README's measured figures for Qwen2-7B in bf16 with LoRA r 8 (bench.py --memory): 15.2 GB of
    weights, 36.8 GB per 4,096-token episode without checkpointing, 2.1 GB with it; an 80 GB GPU."""
    pol = make_policy()
    monkeypatch.setattr(memory, "episode_bytes", lambda p, T: {True: 2.1e9, False: 36.8e9})
    monkeypatch.setattr(memory, "device_bytes", lambda dev: 80e9)
    monkeypatch.setattr(memory, "kv_bytes", lambda p, n, T: 1.9e9)
    monkeypatch.setattr(P.Policy, "parameters", lambda self, recurse=True: iter([_Weights()]))
    monkeypatch.setattr(P.Policy, "buffers", lambda self, recurse=True: iter([]))
    cfg, lines = config(), []
    plan = memory.plan(pol, cfg, given=(), log=lines.append)
    assert plan["fits"] and plan["need"] <= 72e9
    assert cfg.mini_batch_size * cfg.grad_accum == 8                     # the paper's batch per optimizer step
    print(lines[0])


class _Weights:
    """Qwen2-7B's 7.6 B bf16 weights and 20 M fp32 LoRA weights, as one stand-in tensor."""
    requires_grad = False

    def numel(self):
        return 7.6e9

    def element_size(self):
        return 2


def test_on_cpu_the_plan_fits_the_ram_left_free_not_the_machines_total(tmp_path, monkeypatch):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:    3000000 kB\n")
    assert memory.available_bytes(str(info)) == 3000000 * 1024
    assert memory.available_bytes(str(tmp_path / "none")) is None
    monkeypatch.setattr(memory, "available_bytes", lambda: 3000000 * 1024)
    assert memory.device_bytes(torch.device("cpu")) == 3000000 * 1024       # two other runs hold the rest
    monkeypatch.setattr(memory, "available_bytes", lambda: None)             # no meminfo: the machine's RAM
    assert memory.device_bytes(torch.device("cpu")) == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
