"""compare.py on a minute's budget, and the RFT update it compares against."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, SMALL
from harness import models, toolclient

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
BUDGET = ["--threads", "1", "--iterations", "1", "--episodes-per-iteration", "2", "--sft-epochs", "1",
          "--sft-episodes", "4", "--eval-limit", "1", "--max-new-tokens", "16", "--max-steps", "2", "--ppo-epochs", "1"]


def compare(*args):
    return subprocess.run([sys.executable, "-m", "harness.compare", *args], capture_output=True, text=True,
                          cwd=ROOT, env=ENV, timeout=600)


def test_compare_writes_the_table_and_summary_from_one_sft_start_and_does_not_redo_finished_runs(tmp_path, tiny_tok):
    model_dir, out = str(tmp_path / "model"), str(tmp_path / "results")
    model, tok = models.build_tiny(0, tok=tiny_tok, **SMALL)
    model.save_pretrained(model_dir); tok.save_pretrained(model_dir)
    args = ["--seeds", "3", "--output", out, "--methods", "sft", "rft", "steptool", "--model", model_dir, "--full-finetune", *BUDGET]
    r = compare(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary) == {"sft", "rft", "steptool", "ci", "ci_seeds_tasks", "benchmark", "per_seed"}
    assert summary.pop("benchmark") == "embedded v2"   # the evaluation's task file names its version
    assert summary.pop("per_seed")["steptool"]["3"]["overall"] == summary["steptool"]["overall"]["pass_rate_mean"]
    assert set(summary["ci"]) == set(summary["ci_seeds_tasks"]) == {"steptool-sft", "steptool-rft"}
    for ci in (summary.pop("ci")["steptool-sft"], summary.pop("ci_seeds_tasks")["steptool-sft"]):
        assert set(ci) == {"G1", "G2", "G3", "overall"} and all(lo <= hi for lo, hi in ci.values())
    for m in summary.values():
        assert set(m) == {"G1", "G2", "G3", "overall"}
        for g in m.values():
            assert set(g) == {"pass_rate_mean", "pass_rate_std", "recall_mean", "recall_std", "seeds"} and g["seeds"] == [3]
    table = open(os.path.join(out, "table.md")).read()
    assert "| StepTool |" in table and "| RFT |" in table and "Recall" in table
    runs = {m: os.path.join(out, "seed3", m, "metrics.jsonl") for m in ("sft", "rft", "steptool")}
    first = {m: json.loads(open(p).readline()) for m, p in runs.items()}
    assert first["sft"]["iteration"] == 0 and "eval/overall/pass_rate" in first["sft"]
    for m in ("rft", "steptool"):  # one start for all, evaluated once, in the SFT run
        assert first[m]["iteration"] == 1 and len(open(runs[m]).read().splitlines()) == 1
        cfg = torch.load(os.path.join(out, "seed3", m, "checkpoint", "state.pt"), weights_only=False)["config"]
        assert cfg["model"] == os.path.join(out, "seed3", "sft", "checkpoint") and cfg["sft_epochs"] == 0
    assert summary["sft"]["overall"]["pass_rate_mean"] == first["sft"]["eval/overall/pass_rate"]
    last = json.loads(open(runs["rft"]).read().splitlines()[-1])
    assert last["iteration"] == 1 and "rft/solved" in last and "loss/policy" not in last
    stamps = {m: os.path.getmtime(p) for m, p in runs.items()}
    r = compare(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {m: os.path.getmtime(p) for m, p in runs.items()} == stamps  # finished runs are read, not redone


def test_lora_methods_start_from_the_sft_runs_adapter_file_and_the_summary_has_paired_cis(tmp_path, small_model):
    out = str(tmp_path / "results")
    r = compare("--seeds", "0", "--output", out, "--methods", "sft", "steptool", "ppo", "--model", small_model,
                "--no-full-finetune", *BUDGET)
    assert r.returncode == 0, r.stderr[-3000:]
    adapter = os.path.join(out, "seed0", "sft", "sft_adapter.safetensors")
    for m, reward, advantage in (("steptool", "stepgrained", "step"), ("ppo", "final", "token")):   # ppo: the paper's
        run = os.path.join(out, "seed0", m)
        cfg = torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=False)["config"]
        assert cfg["model"] == small_model and cfg["adapters"] == [adapter] and not cfg["eval_start"]
        assert (cfg["reward"], cfg["advantage"]) == (reward, advantage)
        assert os.path.isfile(os.path.join(run, "adapter.safetensors"))
        tasks = json.load(open(os.path.join(run, "eval_tasks.json")))
        assert tasks["iteration"] == 1 and len(tasks["tasks"]) == 3   # --eval-limit 1: one task per group
        assert tasks["benchmark"] == "embedded v2"
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert set(summary["ci"]) == {"steptool-sft", "steptool-ppo", "ppo-sft"}
    assert "Pass Rate differences" in open(os.path.join(out, "table.md")).read()
    # the same SFT start given as a file: evaluated as the run that trained it, the methods start from it
    again = str(tmp_path / "again")
    r = compare("--seeds", "0", "--output", again, "--methods", "sft", "steptool", "--model", small_model,
                "--no-full-finetune", "--sft-adapters", adapter, *BUDGET)
    assert r.returncode == 0, r.stderr[-3000:]
    tasks = lambda d, m: json.load(open(os.path.join(d, "seed0", m, "eval_tasks.json")))
    assert tasks(again, "sft") == tasks(out, "sft")
    cfg = torch.load(os.path.join(again, "seed0", "steptool", "checkpoint", "state.pt"), weights_only=False)["config"]
    assert cfg["adapters"] == [adapter]
    # one start given to several RL seeds: evaluated once (the first seed's SFT run), each seed's methods start from it
    r = compare("--seeds", "0", "1", "--output", again, "--methods", "sft", "steptool", "--model", small_model,
                "--no-full-finetune", "--sft-adapters", adapter, adapter, *BUDGET)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not os.path.exists(os.path.join(again, "seed1", "sft"))
    assert os.path.isfile(os.path.join(again, "seed1", "steptool", "eval_tasks.json"))
    two = json.load(open(os.path.join(again, "summary.json")))
    assert two["sft"]["overall"]["seeds"] == [0, 1] and two["sft"]["overall"]["pass_rate_std"] == 0.0
    assert set(two["per_seed"]["steptool"]) == {"0", "1"}
    assert "**Pass Rate (%) of each seed**" in open(os.path.join(again, "table.md")).read()
    # an SFT start's run is finished with its evaluation: its weights (a no-op LoRA on the merged start) need not be kept
    sft = os.path.join(again, "seed0", "sft")
    shutil.rmtree(os.path.join(sft, "final_model")); os.remove(os.path.join(sft, "adapter.safetensors"))
    stamp = os.path.getmtime(os.path.join(sft, "metrics.jsonl"))
    r = compare("--seeds", "0", "--output", again, "--methods", "sft", "steptool", "--model", small_model,
                "--no-full-finetune", "--sft-adapters", adapter, *BUDGET)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.getmtime(os.path.join(sft, "metrics.jsonl")) == stamp and not os.path.exists(os.path.join(sft, "final_model"))
    # a resumed run needs none of its start's files: the checkpoint's base holds the SFT start merged
    os.rename(adapter, adapter + ".moved")
    run = os.path.join(again, "seed0", "steptool")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "steptool.py"), "--resume", run, "--iterations", "2"],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(line)["iteration"] for line in open(os.path.join(run, "metrics.jsonl"))] == [1, 2]
    os.rename(adapter + ".moved", adapter)
    r = compare("--seeds", "0", "--output", str(tmp_path / "bad"), "--sft-adapters", adapter, adapter, *BUDGET)
    assert r.returncode == 2 and "--sft-adapters" in r.stderr


def test_parallel_runs_are_the_sequential_runs(tmp_path, small_model):
    par, seq = str(tmp_path / "par"), str(tmp_path / "seq")
    common = ["--methods", "sft", "steptool", "--model", small_model, *BUDGET]
    r = compare("--seeds", "0", "1", "--output", par, "--parallel", "2", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    r = compare("--seeds", "1", "--output", seq, *common)
    assert r.returncode == 0, r.stderr[-3000:]
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in open(p)]
    for m in ("sft", "steptool"):
        a, b = (os.path.join(d, "seed1", m) for d in (par, seq))
        assert strip(os.path.join(a, "metrics.jsonl")) == strip(os.path.join(b, "metrics.jsonl"))
        assert json.load(open(os.path.join(a, "eval_tasks.json"))) == json.load(open(os.path.join(b, "eval_tasks.json")))
    summary = json.load(open(os.path.join(par, "summary.json")))
    assert summary["steptool"]["overall"]["seeds"] == [0, 1]


def test_rft_update_trains_on_the_solved_episodes_only(make_policy, tool_server, test_tasks):
    import env
    import rollout
    import steptool
    pol = make_policy(full_finetune=True)
    client = toolclient.ToolClient(tool_server.url)
    ep, _ = rollout.expert_episode(pol, test_tasks[0], client)
    cfg = steptool.Config(ppo_epochs=3, mini_batch_size=2)
    opt = torch.optim.AdamW([p for p in pol.parameters() if p.requires_grad], lr=1e-3)
    before = {k: v.clone() for k, v in pol.state_dict().items()}
    assert steptool.rft_update(pol, opt, [], cfg) == {"rft/solved": 0.0}
    assert all(torch.equal(before[k], v) for k, v in pol.state_dict().items())  # nothing solved: no step

    def nll():
        import ppo
        c = ppo.collate([ep], "step", pol.device)
        with torch.no_grad():
            return -pol(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])[0].mean().item()
    start = nll()
    stats = steptool.rft_update(pol, opt, [ep], cfg)
    assert stats["rft/solved"] == 1.0 and stats["ppo/skipped_updates"] == 0.0
    assert nll() < start - 0.1


def test_rft_takes_as_many_optimizer_steps_per_iteration_as_ppo(make_policy, tool_server, test_tasks, monkeypatch):
    import rollout
    import sft
    import steptool
    pol = make_policy(full_finetune=True)
    client = toolclient.ToolClient(tool_server.url)
    eps = [rollout.expert_episode(pol, t, client)[0] for t in test_tasks[:5]]
    cfg = steptool.Config(episodes_per_iteration=16, mini_batch_size=2, grad_accum=4, ppo_epochs=2)  # PPO: 2 x 2 steps
    steps, real = [], sft.sft_step
    monkeypatch.setattr(sft, "sft_step", lambda pol, opt, part, mbs: steps.append(len(part)) or real(pol, opt, part, mbs))
    opt = torch.optim.AdamW([p for p in pol.parameters() if p.requires_grad], lr=1e-4)
    steptool.rft_update(pol, opt, eps, cfg)
    assert steps == [2, 3, 2, 3]                        # 4 steps, each pass over all 5 Solved episodes once
    steps.clear()
    steptool.rft_update(pol, opt, eps[:1], cfg)
    assert steps == [1, 1]                              # one Solved episode: one step a pass


def test_the_ci_over_seeds_and_tasks_holds_training_variance_the_task_only_ci_leaves_out():
    from harness import compare as C
    r = np.random.default_rng(1)
    keys = [(g, i) for g in ("G1", "G2", "G3") for i in range(120)]
    base = {k: float(r.random() < 0.6) for k in keys}
    lucky = {k: max(v, float(r.random() < 0.4)) for k, v in base.items()}        # one seed far better than the others
    a = [lucky, base, base]
    width = lambda ci: ci["overall"][1] - ci["overall"][0]
    tasks_only, both = C.paired_bootstrap(C.mean_over_seeds(a), base), C.hierarchical_bootstrap(a, [base])
    assert width(both) > 2 * width(tasks_only)
    one = C.hierarchical_bootstrap([lucky], [base])                             # one seed each: the task-only CI
    assert all(abs(x - y) < 1.0 for x, y in zip(one["overall"], C.paired_bootstrap(lucky, base)["overall"]))
    assert C.hierarchical_bootstrap(a, a) != C.hierarchical_bootstrap([base], [base]) == {g: [0.0, 0.0] for g in (
        "G1", "G2", "G3", "overall")}
    with pytest.raises(ValueError, match="different tasks"):
        C.hierarchical_bootstrap(a, [dict(list(base.items())[1:])])


def test_the_2x2_effects_recover_a_known_interaction_and_its_cis_cover_it():
    from harness import compare as C
    r = np.random.default_rng(2)
    keys = [(g, i) for g in ("G1", "G2", "G3") for i in range(200)]
    draw = lambda p: {k: float(r.random() < p) for k in keys}
    # step rewards help by 20 points with step GAE and not at all with token GAE; the rest equal
    per_task = {"steptool": [draw(0.7) for _ in range(3)], "ppo_final": [draw(0.5) for _ in range(3)],
                "steptool_token_adv": [draw(0.5) for _ in range(3)], "ppo": [draw(0.5) for _ in range(3)]}
    summary = {m: {g: {"pass_rate_mean": 100 * np.mean([np.mean([run[k] for k in keys if g in (k[0], "overall")])
                                                        for run in runs])} for g in C.GROUPS} for m, runs in per_task.items()}
    e = C.effects(summary, per_task)
    truth = {"step-grained reward shaping (main effect)": 10, "step-grained optimization (main effect)": 10,
             "interaction (shaping's effect with step GAE minus with token GAE)": 20}
    for name, value in truth.items():
        lo, hi = e[name]["ci_seeds_tasks"]["overall"]
        assert lo < value < hi and abs(e[name]["estimate"]["overall"] - value) < 4, (name, e[name])
        assert e[name]["ci"]["overall"][0] <= e[name]["estimate"]["overall"] <= e[name]["ci"]["overall"][1]
    assert e["interaction (shaping's effect with step GAE minus with token GAE)"]["ci_seeds_tasks"]["overall"][0] > 0
    # a plain difference through the contrast is the hierarchical bootstrap itself
    a, b = per_task["steptool"], per_task["ppo"]
    assert C.contrast_bootstrap([a, b], [1, -1]) == C.hierarchical_bootstrap(a, b)
    table = C.ci_table({**summary, "effects": e, "per_seed": {m: {"0": {}, "1": {}} for m in per_task}})
    assert "2×2" in table and table.count("main effect") == 2 and "interaction" in table and "one seed" not in table
    one = C.ci_table({**summary, "effects": e, "ci_seeds_tasks": {"steptool-ppo": e["step-grained reward shaping "
                      "(main effect)"]["ci"]}, "per_seed": {m: {"0": {}} for m in per_task}})
    assert "over seeds and test tasks" not in one and "(one seed: the task-only CI again)" in one
    with pytest.raises(ValueError, match="different tasks"):   # a task left out of one seed's run: named, no KeyError
        C.mean_over_seeds([per_task["ppo"][0], {k: v for k, v in per_task["ppo"][1].items() if k != keys[0]}])


def test_parallel_processes_share_the_cores_and_a_resumed_run_keeps_its_share(monkeypatch, tmp_path):
    from harness import compare as C
    jobs = [("a", ["--seed", "0"]), ("b", ["--seed", "1"]), ("c", ["--seed", "2"])]
    assert C.shared_threads(jobs, 2, cores=2) == ("--threads", "1")
    assert C.shared_threads(jobs, 8, cores=16) == ("--threads", "5")       # 3 processes, not 8
    assert C.shared_threads(jobs, 1, cores=2) == ()                       # one process: its own threads
    assert C.shared_threads(jobs[:1], 4, cores=2) == ()
    assert C.shared_threads([("a", ["--threads", "2"])] * 2, 2, cores=2) == ("--threads", "2")   # given: kept,
    assert C.shared_threads([("a", ["--threads=2"])], 1) == ("--threads", "2")                  # resumed runs too
    calls = []
    monkeypatch.setattr(C.steptool, "main", lambda argv: calls.append(argv) or [])
    monkeypatch.setattr(C.runs, "find_checkpoint", lambda run: run)        # a checkpoint: resumed
    C.run_once(str(tmp_path), ["--seed", "0"], ("--threads", "1"))
    assert calls[-1] == ["--resume", str(tmp_path), "--threads", "1"]
