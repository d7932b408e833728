"""eval.py against a hostile or careless user: what it refuses, when, and what it never touches.

    a group name read from data (a task file's `group`, --groups) never names a path outside --out,
        nor one of eval.py's own outputs; it is refused before any rollout or judge request
    every --answers file is read and every answer checked before the first judge request
    bad input exits with status 2 and one line, before any work; a failure during the work, 1

The judge is conftest's fake OpenAI endpoint, which counts the requests it is paid for; the
rollouts are replaced by a stand-in that counts its calls, so no model is loaded.
"""
import json
import os

import pytest

import env
import eval as ev
from harness import evaluate as cli  # eval.py's command line
from harness import judge as J
from harness import runs

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ANSWERS = os.path.join(HERE, "fixtures", "stb_converted_G1_instruction.json")
STB_QUERIES = os.path.join(HERE, "fixtures", "stb_queries.json")
TASKS = os.path.join(ROOT, "data", "bench_test.json")


def snapshot(root):
    """{relative path: bytes} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def hostile_groups(tmp_path):
    """The group names a hostile file or flag gives, and the user's file one of them aims at."""
    precious = tmp_path / "precious.json"
    precious.write_text('{"mine": "a week of judge requests"}')
    return ["../../x", str(tmp_path / "precious"), "a/b", "a\0b"]


def solved(n, body):
    """The fake judge: whatever it is asked, the answer is Solved (and the task Solvable)."""
    name = body["tool_choice"]["function"]["name"]
    key, value = ("task_status", "Solvable") if name == "check_task_solvable" else ("answer_status", "Solved")
    args = json.dumps({key: value, "reason": "fake"})
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": name, "arguments": args}}]}}]}, 0


@pytest.fixture
def judge_url(fake_openai):
    srv, url = fake_openai(solved)
    return srv, url


@pytest.fixture
def rollouts(monkeypatch):
    """harness.evaluate.evaluate_model replaced: each task answered at once with Finish give_answer; calls counted."""
    calls = []

    def fake(a, tasks):
        calls.append(len(tasks))
        say = env.Step("Action: Finish", "Finish", {"return_type": "give_answer", "final_answer": "Velmora."})
        return [env.Trajectory(t.query_id, t.query, t.group, [say], "give_answer", "Velmora.", "finish") for t in tasks]
    monkeypatch.setattr(cli, "evaluate_model", fake)
    return calls


def status(argv, capsys):
    """ev.main(argv) -> (exit status, stderr lines); a crash is reported as its exception's name."""
    try:
        code = ev.main(argv)
    except SystemExit as e:
        code = e.code
    except Exception as e:  # noqa: BLE001 -- what a user would see as a traceback
        code = type(e).__name__
    return code, capsys.readouterr().err.strip().splitlines()


# ---- group names from data never become paths elsewhere ---------------------------------------
@pytest.mark.parametrize("which", range(5), ids=["dotdot", "absolute_precious", "slash", "nul", "list"])
def test_a_tasks_files_group_writes_nothing_outside_out_and_is_refused_before_any_rollout(
        tmp_path, judge_url, rollouts, capsys, which):
    group = (hostile_groups(tmp_path) + [["G1"]])[which]
    queries = [{**q, "group": group} for q in json.load(open(STB_QUERIES))]
    tasks = tmp_path / "tasks.json"
    tasks.write_text(json.dumps(queries))
    out = tmp_path / "deep" / "er" / "out"       # ../../x.json would land in tmp_path
    before = snapshot(tmp_path)
    srv, url = judge_url
    code, err = status(["--model", "tiny", "--tasks", str(tasks), "--judge-url", url, "--out", str(out)], capsys)
    assert snapshot(tmp_path) == before            # the precious file unchanged, nothing written anywhere
    assert rollouts == [] and srv.seen == []       # refused before any rollout or judge request ...
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]   # ... as bad input, in one line


@pytest.mark.parametrize("which", range(4), ids=["dotdot", "absolute_precious", "slash", "nul"])
def test_a_hostile_groups_flag_is_refused_before_any_judge_request(tmp_path, judge_url, capsys, which):
    group = hostile_groups(tmp_path)[which]
    out = tmp_path / "deep" / "er" / "out"
    before = snapshot(tmp_path)
    srv, url = judge_url
    code, err = status(["--answers", ANSWERS, "--groups", group, "--judge-url", url, "--out", str(out)], capsys)
    assert snapshot(tmp_path) == before and srv.seen == []
    assert code == 2 and len(err) == 1 and "--groups" in err[0]


def test_write_outputs_refuses_every_hostile_group_before_writing_anything(tmp_path):
    _, scored, groups = J.evaluate([], [], lambda t, j: 1)
    entry = {"query": "q", "tool_names": [], "answer_steps": "", "final_step": "", "is_solved": {"0": "AnswerStatus.Unsolved"}}
    outside = lambda snap: {k: v for k, v in snap.items() if not k.startswith("deep")}
    for group in hostile_groups(tmp_path) + ["results", ".steptool-run"]:   # the last two: our own outputs' names
        for claimed in (False, True):                # a library call, and the command line's claimed --out
            out = tmp_path / "deep" / "er" / ("run" if claimed else "lib")
            before = outside(snapshot(tmp_path))
            run = runs.claim(str(out), "eval", "--out", overwrite=True) if claimed else None
            with pytest.raises(runs.RunError, match="plain name|over"):
                cli.write_outputs(str(out), {"G1": {"1": entry}, group: {"1": entry}}, scored, groups, run)
            if run:
                run.release()
            assert outside(snapshot(tmp_path)) == before                  # the precious file unchanged
            assert [n for n in os.listdir(out) if n != runs.MARKER and n != runs.LOCK] == []   # not even G1.json


def test_a_link_in_out_to_a_users_file_is_not_written_through(tmp_path):
    precious = tmp_path / "precious.json"
    precious.write_text("mine")
    out = tmp_path / "out"
    with runs.claim(str(out), "eval", "--out") as run:
        run.register("G1.json")
        os.symlink(precious, out / "G1.json")        # planted after the claim: run.path_of still refuses it
        labels, scored, groups = J.evaluate([], [], lambda t, j: 1)
        with pytest.raises(runs.RunError, match="resolves outside"):
            cli.write_outputs(str(out), {"G1": {}}, scored, groups, run)
    assert precious.read_text() == "mine"


# ---- --answers are read whole before the judge is paid for ------------------------------------
def good_answer():
    return json.load(open(ANSWERS))["201"]


BAD_ANSWERS = {   # each passes for an answer at a first glance; the judge would trip on it mid-run
    "node_not_an_object": lambda e: {**e, "answer": {**e["answer"], "answer_details": [1]}},
    "next_not_a_list": lambda e: {**e, "answer": {**e["answer"], "answer_details": [
        {"role": "system", "message": "", "next": "tool"}]}},
    "tool_not_an_object": lambda e: {**e, "available_tools": [{"function": ["forecast"]}]},
    "final_answer_not_text": lambda e: {**e, "answer": {**e["answer"], "final_answer": 3}},
}


@pytest.mark.parametrize("how", BAD_ANSWERS)
def test_a_bad_answer_in_any_file_is_refused_before_the_first_judge_request(tmp_path, judge_url, capsys, how):
    good = {str(q): good_answer() for q in range(40)}   # 40 answers x 3 repeats: the requests a late check paid for
    bad = tmp_path / "G1_tool.json"
    bad.write_text(json.dumps({**good, "7": BAD_ANSWERS[how](good_answer())}))
    srv, url = judge_url
    out = tmp_path / "out"
    code, err = status(["--answers", ANSWERS, str(bad), "--judge-url", url, "--out", str(out)], capsys)
    assert len(srv.seen) == 0
    assert code == 2 and len(err) == 1 and str(bad) in err[0] and not out.exists()


# ---- exit statuses ------------------------------------------------------------------------------
def closed_url():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


BAD_FLAGS = {   # bad input, each refused with status 2 and one line before anything is read or written
    "no_mode": ([], "give --model and --tasks"),
    "tasks_without_model": (["--tasks", TASKS], "--tasks needs --model"),
    "model_without_tasks": (["--model", "tiny"], "--model needs --tasks"),
    "two_modes": (["--labels", ANSWERS, "--answers", ANSWERS], "one of them at a time"),
    "groups_count": (["--labels", ANSWERS, "--groups", "a", "b"], "--groups gives 2 names for 1"),
    "groups_without_files": (["--model", "tiny", "--tasks", TASKS, "--groups", "G1"], "--groups gives 1 names for 0"),
    "adapters_without_model": (["--answers", ANSWERS, "--judge-url", "http://x/v1", "--adapters", TASKS], "--adapters"),
    "queries_with_model": (["--model", "tiny", "--tasks", TASKS, "--queries", TASKS], "--queries"),
    "negative_seed": (["--model", "tiny", "--tasks", TASKS, "--seed", "-1"], "--seed -1"),
    "huge_judge_timeout": (["--answers", ANSWERS, "--judge-url", "http://x/v1", "--judge-timeout", "1e308"],
                           "--judge-timeout"),
    "huge_judge_retries": (["--answers", ANSWERS, "--judge-url", "http://x/v1", "--judge-retries", "5000"],
                           "--judge-retries 5000"),
    "turn_longer_than_the_context": (["--model", "tiny", "--tasks", TASKS, "--max-new-tokens", "5000"],
                                     "--max-new-tokens 5000"),
    "repeats_zero": (["--answers", ANSWERS, "--judge-url", "http://x/v1", "--repeats", "0"], "--repeats 0"),
    "judge_choice": (["--answers", ANSWERS, "--judge-url", "http://x/v1", "--judge", "gpt"], "--judge gpt"),
    "judge_url_not_a_url": (["--answers", ANSWERS, "--judge-url", "localhost:8000"], "--judge-url localhost:8000"),
    "tool_server_not_a_url": (["--model", "tiny", "--tasks", TASKS, "--tool-server", "localhost:1"], "--tool-server"),
    "tool_server_not_answering": (["--model", "tiny", "--tasks", TASKS, "--tool-server", "CLOSED"], "not reachable"),
    "dtype": (["--model", "tiny", "--tasks", TASKS, "--dtype", "float16"], "--dtype float16"),
    "not_an_int": (["--repeats", "three"], "--repeats"),
    "unknown_flag": (["--labels", ANSWERS, "--frobnicate"], "--frobnicate"),
}


@pytest.mark.parametrize("name", BAD_FLAGS)
def test_bad_flags_exit_2_with_one_line_before_any_work(tmp_path, rollouts, capsys, name):
    argv, words = BAD_FLAGS[name]
    out = tmp_path / "out"
    argv = [closed_url() if x == "CLOSED" else x for x in argv] + ["--out", str(out)]
    code, err = status(argv, capsys)
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert rollouts == [] and not out.exists()


def test_a_model_that_does_not_load_is_bad_input_too(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = status(["--model", "tiny", "--adapters", TASKS, "--tasks", TASKS, "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1 and "adapter file" in err[0]
    assert set(os.listdir(out)) <= {".lock", ".steptool-run.json"}   # claimed before the model loads; nothing written
