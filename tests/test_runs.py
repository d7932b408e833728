"""Run folders (runs.py) and the commands that write them: a folder that is not a run of ours is never
written or deleted, an earlier run is replaced only with --overwrite, one run per folder at a time,
--resume continues in the folder it is given, and a checkpoint's state.pt can run no code."""
import hashlib
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TSV = os.path.join(FIXTURES, "reward_steptool.tsv")
# steptool.py on a minimal budget: no SFT, one evaluation task per group
RUN = ["--quick", "--threads", "1", "--eval-limit", "1", "--episodes-per-iteration", "2", "--max-new-tokens", "24",
       "--max-steps", "3", "--sft-epochs", "0", "--save-every", "1"]


def snapshot(d):
    """{relative path: (sha256, mtime_ns)} of every file under d but the lock (a claim writes its pid
    there): equal snapshots = an untouched folder."""
    out = {}
    for root, _, files in os.walk(d):
        for f in set(files) - {".lock"}:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = (hashlib.sha256(open(p, "rb").read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


def foreign_folder(d):
    """A folder of the user's: which sft.py must never delete."""
    os.makedirs(os.path.join(d, "sub"))
    open(os.path.join(d, "IMPORTANT.txt"), "w").write("keep me\n")
    open(os.path.join(d, "sub", "notes.txt"), "w").write("and me\n")
    return snapshot(d)


def iterations(run):
    import json
    return [json.loads(line)["iteration"] for line in open(os.path.join(run, "metrics.jsonl"))]


def refused(capsys, main, argv):
    """main(argv) stops before any work with exit status 2 -> its one-line message."""
    capsys.readouterr()                                         # what earlier calls printed
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_model):
    """A steptool.py run of one iteration, finished (checkpoint, metrics, final model): copy it, never change it."""
    import steptool
    out = str(tmp_path_factory.mktemp("finished") / "run")
    steptool.main(["--model", small_model, *RUN, "--iterations", "1", "--output", out])
    return out


def copy_of(run, tmp_path, name="copy"):
    dst = str(tmp_path / name)
    shutil.copytree(run, dst)
    return dst


# ---- claim and lock -----------------------------------------------------------------------------
def test_overwrite_deletes_only_what_the_marker_lists_and_refuses_a_folder_holding_anything_else(tmp_path):
    from harness import runs
    d = str(tmp_path / "run")
    with runs.claim(d, "eval", entries=("results.json",)):
        open(os.path.join(d, "results.json"), "w").write("{}")
    with pytest.raises(runs.RunError, match="--overwrite"):
        runs.claim(d, "eval")                                   # an earlier run: not without --overwrite
    open(os.path.join(d, "mine.txt"), "w").write("a user's file, put in later")
    with pytest.raises(runs.RunError, match="mine.txt"):
        runs.claim(d, "eval", overwrite=True)                   # named, and nothing deleted
    assert sorted(os.listdir(d)) == [".lock", runs.MARKER, "mine.txt", "results.json"]
    os.remove(os.path.join(d, "mine.txt"))
    with runs.claim(d, "eval", overwrite=True):
        assert sorted(os.listdir(d)) == [".lock", runs.MARKER]
    with pytest.raises(runs.RunError, match="not a eval one|not a sft one"):
        runs.claim(d, "sft", overwrite=True)                    # another kind's folder: never replaced


def test_a_second_claim_of_a_folder_in_use_is_refused_naming_the_pid_until_the_first_is_released(tmp_path):
    from harness import runs
    d = str(tmp_path / "run")
    first = runs.claim(d, "steptool")
    with pytest.raises(runs.RunError, match=f"another run \\(pid {os.getpid()}\\) is writing"):
        runs.claim(d, "steptool", resume=True)                  # same process, second open file: refused
    first.release()
    runs.claim(d, "steptool", resume=True).release()


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    from harness import runs
    d = str(tmp_path / "run")
    code = f"import sys, time; sys.path.insert(0, {ROOT!r}); from harness import runs; runs.claim({d!r}, 'steptool'); print('held', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(runs.RunError, match=f"pid {p.pid}"):
        runs.claim(d, "steptool", resume=True)
    p.send_signal(signal.SIGKILL)
    p.wait()
    runs.claim(d, "steptool", resume=True).release()            # the kernel dropped the flock with the process


# ---- sft.py -------------------------------------------------------------------------------------
def sft_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sft.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=300)


def test_sft_into_a_folder_of_the_users_is_refused_with_status_2_and_the_folder_is_untouched(tmp_path, small_model):
    d = str(tmp_path / "mine")
    before = foreign_folder(d)
    r = sft_cli("--model", small_model, "--data", TSV, "--epochs", "1", "--output", d)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1 and f"--output {d}" in r.stderr and "not a run folder of ours" in r.stderr
    assert snapshot(d) == before and sorted(os.listdir(d)) == ["IMPORTANT.txt", "sub"]  # not even a lock file


def test_sft_output_dot_in_a_non_empty_folder_is_refused(tmp_path, small_model):
    open(tmp_path / "IMPORTANT.txt", "w").write("keep me\n")
    r = sft_cli("--model", small_model, "--data", TSV, "--epochs", "1", "--output", ".", cwd=str(tmp_path))
    assert r.returncode == 2 and "--output ." in r.stderr
    assert os.listdir(tmp_path) == ["IMPORTANT.txt"]


def test_sft_writes_a_checkpoint_that_loads_and_replaces_it_only_with_overwrite(tmp_path, small_model, capsys):
    from harness import models, runs
    import sft
    d = str(tmp_path / "sft")
    argv = ["--model", small_model, "--data", TSV, "--epochs", "1", "--output", d]
    sft.main(argv)
    models.load_policy(d)                                            # DIR/policy.json: our checkpoint
    assert not os.path.exists(os.path.join(d, ".partial"))      # the temporary sub-folder is gone
    assert set(os.listdir(d)) - {".lock", runs.MARKER} <= set(runs.read_marker(d)["entries"])
    before = snapshot(d)
    msg = refused(capsys, sft.main, argv)
    assert f"--output {d}" in msg and "--overwrite" in msg
    assert snapshot(d) == before
    sft.main(argv + ["--overwrite"])
    after = snapshot(d)
    assert after.keys() == before.keys() and after["policy.json"][1] != before["policy.json"][1]  # written again
    models.load_policy(d)


# ---- steptool.py --------------------------------------------------------------------------------
def test_steptool_into_a_folder_of_the_users_is_refused_even_with_overwrite(tmp_path, small_model, capsys):
    import steptool
    d = str(tmp_path / "mine")
    before = foreign_folder(d)
    for extra in ([], ["--overwrite"]):
        msg = refused(capsys, steptool.main, ["--model", small_model, *RUN, "--iterations", "1", "--output", d, *extra])
        assert f"--output {d}" in msg and "not a run folder of ours" in msg
    assert snapshot(d) == before and sorted(os.listdir(d)) == ["IMPORTANT.txt", "sub"]


def test_steptool_into_an_earlier_run_is_refused_without_overwrite_and_replaced_with_it(tmp_path, small_model, capsys):
    import steptool
    d = str(tmp_path / "run")
    argv = ["--model", small_model, *RUN, "--iterations", "1", "--output", d]
    steptool.main(argv)
    open(os.path.join(d, "curves.png"), "wb").write(b"stale")  # a name the run writes (matplotlib is optional)
    before = snapshot(d)
    msg = refused(capsys, steptool.main, argv)
    assert f"--resume {d}" in msg and "--overwrite" in msg and snapshot(d) == before
    steptool.main(argv[:-4] + ["--iterations", "0", "--output", d, "--overwrite"])
    assert iterations(d) == [0]
    assert torch.load(os.path.join(d, "checkpoint", "state.pt"), weights_only=True)["iteration"] == 0
    assert not os.path.exists(os.path.join(d, "curves.png")) or open(os.path.join(d, "curves.png"), "rb").read() != b"stale"


def test_resume_of_a_copied_run_writes_to_the_copy_and_leaves_the_original_byte_identical(tmp_path, finished_run):
    import steptool
    original = snapshot(finished_run)
    copy = copy_of(finished_run, tmp_path)
    copied = snapshot(copy)
    steptool.main(["--resume", copy])                           # finished: the final model and table again
    assert snapshot(finished_run) == original
    now = snapshot(copy)
    assert now["final_model/config.json"][1] != copied["final_model/config.json"][1]  # written in the copy
    assert iterations(copy) == [0, 1]


def test_resume_with_more_iterations_extends_a_finished_run(tmp_path, finished_run):
    import steptool
    copy = copy_of(finished_run, tmp_path)
    steptool.main(["--resume", copy, "--iterations", "2"])
    assert iterations(copy) == [0, 1, 2]
    state = torch.load(os.path.join(copy, "checkpoint", "state.pt"), weights_only=True)
    assert state["iteration"] == 2 and state["config"]["iterations"] == 2 and state["config"]["output"] == copy


def test_resume_refuses_a_flag_that_would_change_the_run_and_fewer_iterations_than_done(tmp_path, finished_run, capsys):
    import steptool
    copy = copy_of(finished_run, tmp_path)
    before = snapshot(copy)
    msg = refused(capsys, steptool.main, ["--resume", copy, "--lr", "1", "--save-every", "5"])
    assert "--lr" in msg and "--save-every (" not in msg       # --save-every does not change the run
    msg = refused(capsys, steptool.main, ["--resume", copy, "--iterations", "0"])
    assert "--iterations 0" in msg and "iteration 1" in msg
    assert snapshot(copy) == before


def test_a_crafted_state_pt_is_refused_unread_and_runs_no_code(tmp_path, finished_run, capsys):
    import steptool
    copy = copy_of(finished_run, tmp_path)
    victim = str(tmp_path / "created-by-the-pickle")

    class Crafted:
        def __reduce__(self):
            return (open, (victim, "w"))
    torch.save({"iteration": Crafted()}, os.path.join(copy, "checkpoint", "state.pt"))
    msg = refused(capsys, steptool.main, ["--resume", copy])
    assert os.path.join(copy, "checkpoint", "state.pt") in msg
    assert not os.path.exists(victim)


# ---- eval.py and compare.py ---------------------------------------------------------------------
def test_eval_out_into_a_folder_of_the_users_is_refused(tmp_path, small_model, capsys):
    import eval as ev
    d = str(tmp_path / "mine")
    before = foreign_folder(d)
    for extra in ([], ["--overwrite"]):
        msg = refused(capsys, ev.main, ["--model", small_model, "--tasks", os.path.join(ROOT, "data", "bench_test.json"),
                                        "--max-steps", "1", "--max-new-tokens", "4", "--out", d, *extra])
        assert f"--out {d}" in msg and "not a run folder of ours" in msg
    assert snapshot(d) == before and sorted(os.listdir(d)) == ["IMPORTANT.txt", "sub"]


def test_compare_into_a_folder_of_the_users_is_refused(tmp_path, capsys):
    from harness import compare
    d = str(tmp_path / "mine")
    before = foreign_folder(d)
    msg = refused(capsys, compare.main, ["--seeds", "0", "--methods", "sft", "--output", d, "--iterations", "0",
                                         "--sft-epochs", "0", "--eval-limit", "1", "--max-steps", "1"])
    assert f"--output {d}" in msg and snapshot(d) == before


def test_the_committed_results_folder_is_a_compare_folder_of_ours():
    from harness import runs
    m = runs.read_marker(os.path.join(ROOT, "results"))
    assert m["kind"] == "compare" and {"table.md", "summary.json", "curves.png"} <= set(m["entries"])


def test_no_folder_without_a_marker_is_taken_over_but_a_readable_run_to_resume(tmp_path, capsys):
    from harness import compare
    import steptool
    d = str(tmp_path / "mine")
    os.makedirs(os.path.join(d, "base")); open(os.path.join(d, "base", "weights.bin"), "w").write("mine")
    before = snapshot(d)
    msg = refused(capsys, steptool.main, ["--resume", d])                # names a run writes, but no checkpoint
    assert "no checkpoint" in msg and snapshot(d) == before and sorted(os.listdir(d)) == ["base"]
    t = str(tmp_path / "tables")
    os.makedirs(t); open(os.path.join(t, "table.md"), "w").write("my table")
    msg = refused(capsys, compare.main, ["--seeds", "0", "--methods", "sft", "--output", t])
    assert "not a run folder of ours" in msg and open(os.path.join(t, "table.md")).read() == "my table"


def test_overwrite_refuses_a_folder_that_holds_the_model_the_run_reads(tmp_path, finished_run, capsys):
    import steptool
    copy = copy_of(finished_run, tmp_path)
    before = snapshot(copy)
    msg = refused(capsys, steptool.main, ["--model", os.path.join(copy, "checkpoint"), *RUN, "--iterations", "1",
                                          "--output", copy, "--overwrite"])
    assert "which this run reads" in msg and snapshot(copy) == before


def test_a_lock_file_of_someone_elses_is_not_ours_to_take(tmp_path):
    from harness import runs
    d = tmp_path / "mine"
    d.mkdir(); (d / ".lock").write_text("my own lock file")
    with pytest.raises(runs.RunError, match="not a run folder of ours"):
        runs.claim(str(d), "steptool")
    assert (d / ".lock").read_text() == "my own lock file" and os.listdir(d) == [".lock"]


def test_resume_refuses_to_end_an_unfinished_run_where_its_checkpoint_stands(tmp_path, finished_run, capsys):
    import steptool
    copy = copy_of(finished_run, tmp_path)
    st = os.path.join(copy, "checkpoint", "state.pt")
    state = torch.load(st, weights_only=True)
    state["config"]["iterations"] = 3                            # as if killed after iteration 1 of 3
    torch.save(state, st)
    msg = refused(capsys, steptool.main, ["--resume", copy, "--iterations", "1"])
    assert "stopped at iteration 1 of 3" in msg
