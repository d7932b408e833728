"""Failures of the file system and of the process are one line: an output folder that cannot be made
(a name too long, a read-only file system) leaves nothing behind; a checkpoint that cannot be written
(a full disk) says which one is intact; Ctrl-C and SIGTERM stop a run in one line, its lock released,
offering only what will work next."""
import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

from harness import models, runs
from harness import toolclient
from conftest import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_an_output_name_too_long_is_one_line_and_creates_no_folder(tmp_path):
    out = tmp_path / "a" / "b" / "c" / ("x" * 300) / "run"
    with pytest.raises(runs.RunError, match="File name too long") as e:
        runs.claim(str(out), "steptool")
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []                     # not even a/b/c


def test_an_output_on_a_read_only_file_system_is_one_line(tmp_path, monkeypatch):
    def refuse(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(runs.RunError, match="Read-only file system"):
        runs.claim(str(tmp_path / "new" / "run"), "steptool")


def test_a_subprocess_with_an_impossible_output_exits_2_in_one_line(tmp_path):
    out = str(tmp_path / "deep" / ("y" * 300))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "steptool.py"), "--quick", "--output", out],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "File name too long" in r.stderr
    assert os.listdir(tmp_path) == []


class Saving:
    """A stand-in policy: what models.save_checkpoint writes of one (models.save_policy, replaced below)."""


@pytest.fixture(autouse=True)
def save_policy_writes_a_stub(monkeypatch):
    def save_policy(policy, path, base_dir=None, state=None):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "policy.json"), "w") as f:
            f.write("{}")
    monkeypatch.setattr(models, "save_policy", save_policy)


def test_a_full_disk_while_writing_a_checkpoint_says_so_and_which_checkpoint_is_intact(tmp_path, monkeypatch):
    run = str(tmp_path)
    models.save_checkpoint(run, Saving(), {"iteration": 1})
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                     "data/0: file write failed: unexpected pos 64 vs 136")))
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(runs.RunError) as e:
        models.save_checkpoint(run, Saving(), {"iteration": 2})
    msg = str(e.value)
    assert "no space left on device" in msg and f"{run}/checkpoint, is intact" in msg and f"--resume {run}" in msg
    assert not os.path.exists(os.path.join(run, "checkpoint.tmp"))
    assert torch.load(os.path.join(run, "checkpoint", "state.pt"))["iteration"] == 1


def test_an_errno_failure_while_writing_names_its_meaning(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(runs.RunError, match="No space left on device.*no checkpoint was saved before"):
        models.save_checkpoint(str(tmp_path), Saving(), {"iteration": 1})


def stop(tmp_path, sig, after, small_model, extra=()):
    """A steptool.py run stopped by `sig` once a stdout line starts with `after` -> (process, output)."""
    out = str(tmp_path / "run")
    args = ["--model", small_model, "--quick", "--threads", "1", "--eval-limit", "1", "--episodes-per-iteration", "2",
            "--max-new-tokens", "24", "--max-steps", "3", "--iterations", "4", "--save-every", "1", *extra]
    # SIGINT at its default even when these tests run in a background job (which starts with it ignored)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "steptool.py"), *args, "--output", out], cwd=ROOT,
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:
        if line.startswith(after):
            p.send_signal(sig)
            break
    _, err = p.communicate(timeout=120)
    return p, err, out


def test_sigterm_after_a_checkpoint_is_one_line_that_offers_resume_and_the_lock_is_released(tmp_path, small_model):
    p, err, out = stop(tmp_path, signal.SIGTERM, "iter    1", small_model)
    assert p.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("steptool: interrupted; the last checkpoint")
    assert f"--resume {out}" in err
    r = subprocess.run([sys.executable, os.path.join(ROOT, "steptool.py"), "--resume", out, "--iterations", "1"],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert "another run" not in r.stderr                 # the lock went with the process


def test_ctrl_c_before_any_checkpoint_offers_only_a_new_start(tmp_path, small_model):
    p, err, out = stop(tmp_path, signal.SIGINT, "memory plan", small_model)
    assert p.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "it saved no checkpoint: start again, with --overwrite" in err and "--resume" not in err


def test_a_folder_whose_run_saved_no_checkpoint_is_refused_without_offering_resume(tmp_path):
    out = str(tmp_path / "run")
    with runs.claim(out, "steptool", entries=("metrics.jsonl",)):
        open(os.path.join(out, "metrics.jsonl"), "w").close()          # stopped during SFT: no checkpoint
    with pytest.raises(runs.RunError) as e:
        runs.claim(out, "steptool")
    assert "--resume" not in str(e.value) and "saved no checkpoint" in str(e.value) and "--overwrite" in str(e.value)
    os.makedirs(os.path.join(out, "checkpoint")); open(os.path.join(out, "checkpoint", "state.pt"), "w").close()
    with pytest.raises(runs.RunError, match=f"continue it with --resume {out}"):
        runs.claim(out, "steptool")


def test_expert_episodes_longer_than_max_context_are_left_out_of_sft_with_a_count(tmp_path, small_model):
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "steptool.py"), "--model", small_model, "--quick",
                        "--threads", "1", "--iterations", "0", "--no-eval-start", "--max-new-tokens", "24",
                        "--max-context", "300", "--output", out],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "expert episodes are longer than --max-context 300 tokens: left out" in r.stdout


def test_a_model_path_that_is_a_symlink_loop_is_named_as_such(tmp_path):
    from harness import checks
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(checks.InputError, match="Too many levels of symbolic links"):
        checks.check_model(str(loop))


def test_a_batch_whose_every_episode_ends_before_its_first_turn_goes_on_to_the_waiting_tasks(make_policy, tool_server,
                                                                                           test_tasks):
    import env
    import rollout
    eps, trajs = rollout.rollout(make_policy(), test_tasks[:3], toolclient.ToolClient(tool_server.url), max_new_tokens=8,
                                 max_context=20, batch_size=1)       # no prompt fits: each ends at once
    assert [t.end for t in trajs] == ["max_context"] * 3
