"""steptool.py end to end, as subprocesses: the quick run, the real-model path, offline mode,
resume after a kill, and a tool server that is down or dies mid-run."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FIXTURES, ROOT
from harness import toolclient

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SMALL_RUN = ["--quick", "--threads", "1", "--eval-limit", "1", "--episodes-per-iteration", "2",
             "--max-new-tokens", "24", "--max-steps", "3"]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "steptool.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=ENV, timeout=timeout)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in f]


def test_quick_run_of_the_default_finishes_with_metrics_checkpoint_and_merged_model(tmp_path):
    out = str(tmp_path / "run")
    r = run("--quick", "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(out)
    assert [x["iteration"] for x in m] == [0, 1, 2]
    assert "eval/overall/pass_rate" in m[0] and "eval/overall/pass_rate" in m[-1]
    assert "loss/policy" in m[1] and "reward/step_mean" in m[1]
    assert os.path.isfile(os.path.join(out, "checkpoint", "state.pt"))
    assert os.path.isfile(os.path.join(out, "final_model", "config.json"))
    assert "after PPO" in r.stdout


def test_real_model_path_from_a_save_pretrained_folder_runs_an_iteration(tmp_path, small_model):
    out = str(tmp_path / "run")
    r = run("--model", small_model, *SMALL_RUN, "--iterations", "1", "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["iteration"] for x in metrics(out)] == [0, 1]
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(os.path.join(out, "final_model"))  # a plain HF checkpoint


def test_offline_mode_runs_ppo_over_the_trajectories_of_a_tsv(tmp_path, small_model):
    out = str(tmp_path / "run")
    r = run("--model", small_model, *SMALL_RUN, "--iterations", "2", "--data",
            os.path.join(FIXTURES, "reward_steptool.tsv"), "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "offline:" in r.stdout
    m = metrics(out)
    assert m[-1]["iteration"] == 2 and m[-1]["ppo/episodes"] == 2 and "rollout/steps" not in m[-1]


def test_a_malformed_tsv_fails_naming_the_file_and_line(tmp_path, small_model):
    bad = tmp_path / "bad.tsv"
    bad.write_text("prompt\tresponse\treward\n['a']\t['b', 'c']\t[1.0]\n")
    r = run("--model", small_model, *SMALL_RUN, "--data", str(bad), "--output", str(tmp_path / "run"))
    assert r.returncode != 0 and "bad.tsv:2:" in r.stderr  # file and line


def test_killed_right_after_a_checkpoint_and_resumed_ends_with_the_same_metrics(tmp_path, small_model):
    args = ["--model", small_model, *SMALL_RUN, "--iterations", "3", "--save-every", "1"]
    whole = str(tmp_path / "whole")
    assert run(*args, "--output", whole).returncode == 0
    cut = str(tmp_path / "cut")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "steptool.py"), *args, "--output", cut],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:                      # kill it once iteration 2's checkpoint is on disk
        if line.startswith("iter    2"):
            deadline = time.time() + 60
            while time.time() < deadline:
                st = os.path.join(cut, "checkpoint", "state.pt")
                if os.path.isfile(st) and torch.load(st, weights_only=False)["iteration"] == 2:
                    break
                time.sleep(0.05)
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    assert p.returncode == -signal.SIGKILL and len(metrics(cut)) == 3
    r = run("--resume", cut)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout
    assert metrics(cut) == metrics(whole)


def test_an_unreachable_tool_server_fails_before_any_training(tmp_path):
    t0 = time.time()
    r = run("--tool-server", "http://127.0.0.1:9", "--output", str(tmp_path / "run"), timeout=60)
    assert r.returncode != 0 and "http://127.0.0.1:9" in r.stderr and "not reachable" in r.stderr
    assert time.time() - t0 < 60 and not os.path.exists(tmp_path / "run" / "checkpoint")


def test_a_tool_server_lost_mid_run_stops_the_run_with_its_last_checkpoint_intact(tmp_path, small_model, monkeypatch):
    """Iteration 2's rollout finds the server gone (the client has retried and raised, as
    test_env's ToolClient tests show): the run stops with an error that points to --resume, and the
    checkpoint of iteration 1 is whole. (In-process: a random model makes no tool call of its own.)"""
    import env
    import rollout
    import steptool
    from harness import models
    real = rollout.rollout

    def dying(policy, tasks, client, iteration=0, **kw):
        if iteration == 2:
            raise toolclient.ToolServerError(f"tool server at {client.url} unreachable after 4 tries: HTTP 503")
        return real(policy, tasks, client, iteration=iteration, **kw)

    monkeypatch.setattr(rollout, "rollout", dying)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        steptool.main(["--model", small_model, *SMALL_RUN, "--iterations", "3", "--save-every", "1", "--output", out])
    assert "unreachable" in str(e.value) and f"--resume {out}" in str(e.value)
    models.load_policy(os.path.join(out, "checkpoint"))  # the checkpoint is whole
    assert torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=False)["iteration"] == 1
    assert [m["iteration"] for m in metrics(out)] == [0, 1]


def test_a_run_killed_in_its_first_evaluation_resumes_there_without_redoing_sft(tmp_path, small_model, monkeypatch):
    """SFT can take an hour on a real model: its result is checkpointed before the first evaluation, and
    the run writes its SFT adapter file, each task's evaluation and its final adapter file."""
    import steptool
    import sft as SFT
    out = str(tmp_path / "run")
    real_eval, real_sft, calls = steptool.evaluate, SFT.sft, []

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(steptool, "evaluate", killed)
    with pytest.raises(SystemExit) as stopped:                 # Ctrl-C: one line, exit status 130
        steptool.main(["--model", small_model, *SMALL_RUN, "--iterations", "1", "--output", out])
    assert stopped.value.code == 130
    state = torch.load(os.path.join(out, "checkpoint", "state.pt"), weights_only=False)
    assert state["iteration"] == 0 and state["metrics"] == [] and os.path.isfile(os.path.join(out, "sft_adapter.safetensors"))
    monkeypatch.setattr(steptool, "evaluate", real_eval)
    monkeypatch.setattr(SFT, "sft", lambda *a, **k: calls.append(1) or real_sft(*a, **k))
    steptool.main(["--resume", out])
    assert calls == [] and [m["iteration"] for m in metrics(out)] == [0, 1]
    assert "eval/overall/pass_rate" in metrics(out)[0]
    each = json.load(open(os.path.join(out, "eval_tasks.json")))
    assert each["iteration"] == 1 and {t["group"] for t in each["tasks"]} == {"G1", "G2", "G3"}
    with gzip.open(os.path.join(out, "eval_trajectories.jsonl.gz"), "rt") as f:   # each task's episode
        trajs = [json.loads(line) for line in f]
    assert sorted((t["group"], str(t["query_id"]), t["pass"]) for t in trajs) == \
           sorted((t["group"], str(t["query_id"]), t["pass"]) for t in each["tasks"])
    for t in trajs:
        assert t["iteration"] == 1 and t["steps"] and {"name", "arguments", "error", "succ", "observation"} <= set(t["steps"][0])
        assert t["end"] in ("finish", "max_steps", "max_context", "server_error")
    assert os.path.isfile(os.path.join(out, "adapter.safetensors"))


def test_a_run_killed_in_its_sft_warm_start_goes_on_from_its_last_sft_step_with_the_same_numbers(
        tmp_path, small_model, monkeypatch, capsys):
    """A warm start of hours is checkpointed as it goes (every step here): a run killed in it continues at the
    step after its last checkpoint, not from the start, and ends with the weights and metrics of a run never stopped."""
    import sft as SFT
    import steptool
    from harness import launch
    monkeypatch.setattr(launch, "SFT_SAVE_S", 0)
    args = ["--model", small_model, *SMALL_RUN, "--iterations", "1", "--sft-epochs", "2", "--lora-dropout", "0.1"]  # 4 steps
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    steptool.main([*args, "--output", whole])
    real, calls = SFT.sft_step, []

    def counted(*a, **k):
        calls.append(1)
        if len(calls) == 3:                               # killed in the third step, after two were saved
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(SFT, "sft_step", counted)
    with pytest.raises(SystemExit) as stopped:
        steptool.main([*args, "--output", cut])
    assert stopped.value.code == 130 and f"--resume {cut}" in capsys.readouterr().err
    state = torch.load(os.path.join(cut, "checkpoint", "state.pt"), weights_only=True)
    assert state["sft_step"] == 2 and not os.path.exists(os.path.join(cut, "sft_adapter.safetensors"))
    calls.clear()
    steptool.main(["--resume", cut])
    assert len(calls) == 2                                # the two steps left, not all four again
    assert metrics(cut) == metrics(whole)
    for name in ("sft_adapter.safetensors", "adapter.safetensors"):
        with open(os.path.join(whole, name), "rb") as a, open(os.path.join(cut, name), "rb") as b:
            assert a.read() == b.read(), name


def test_a_model_that_cannot_be_loaded_fails_fast(tmp_path):
    t0 = time.time()
    r = run("--model", str(tmp_path / "no-such-model"), "--output", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 2 and "No such file or directory" in r.stderr and not os.path.exists(tmp_path / "run")
    (tmp_path / "empty-model").mkdir()   # a folder that holds no model: a load error, one line
    r = run("--model", str(tmp_path / "empty-model"), "--output", str(tmp_path / "run2"), timeout=120)
    assert r.returncode != 0 and "cannot load model" in r.stderr and "Traceback" not in r.stderr
    assert time.time() - t0 < 60


def test_the_flags_table_in_docs_is_the_one_help_gives_today():
    """docs/flags.md is generated from steptool.py's --help (python -m harness.launch --flags-table > docs/flags.md):
    a flag added, removed or changed without regenerating it fails here."""
    from harness import launch
    with open(os.path.join(ROOT, "docs", "flags.md")) as f:
        assert f.read() == launch.flags_table(), "docs/flags.md is stale: python -m harness.launch --flags-table > docs/flags.md"


def test_readme_gives_the_two_commands_and_links_the_flags_table():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_cmd = ci.strip().splitlines()[-1]
    assert test_cmd in readme and "pip install -r requirements.txt && python steptool.py" in readme
    assert "docs/flags.md" in readme and len(readme.splitlines()) <= 250


def test_sft_episodes_sample_every_group_in_turn(train_tasks):
    import steptool
    first = steptool.across_groups([t for t in train_tasks if t.expert])[:30]
    assert [t.group for t in first[:3]] == ["G1", "G2", "G3"]
    assert {g: sum(t.group == g for t in first) for g in ("G1", "G2", "G3")} == {"G1": 10, "G2": 10, "G3": 10}


def test_tasks_without_expert_trajectories_skip_the_sft_warm_start_and_say_so(tmp_path, capsys, small_model):
    """A user's own tasks (StableToolBench queries) have answers but no expert trajectory: the paper's
    schedule asks for an SFT epoch, which is skipped with one line; PPO starts from --model as given."""
    import steptool
    from harness import launch
    data = json.load(open(os.path.join(ROOT, "data", "bench_train.json")))
    data["tasks"] = [{k: v for k, v in t.items() if k != "expert"} for t in data["tasks"][:3]]
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps(data))
    out = str(tmp_path / "run")
    assert launch.parse_args(["--model", small_model]).sft_epochs == 1
    steptool.main(["--model", small_model, "--tasks", str(tasks), "--iterations", "0", "--no-eval-start",
                   "--threads", "1", "--output", out])
    assert ("sft: the training tasks carry no usable expert trajectories; no SFT warm start, PPO starts from --model as given"
            in capsys.readouterr().out)
    assert not os.path.exists(os.path.join(out, "sft_adapter.safetensors"))
    assert os.path.isfile(os.path.join(out, "checkpoint", "state.pt"))
