"""Specification of judge.py's pass-rate decision (StableToolBench's evaluator, ToolBench's pass rate) and of
eval.py --answers, against a fake OpenAI-compatible judge on a loopback port that answers each forced
function call by rule (and, where a test says so, with malformed replies, timeouts and 500s).

The fixture tests/fixtures/stb_converted_G1_instruction.json is a StableToolBench converted-answer file of
four queries, judged by hand with the fake judge `by_rule` (answer "Velmora" -> Solved, "maybe" -> Unsure;
the whole process with a weather response, "temp_c" -> Solved; every task Solvable):

    query  ends with                        asked                                 status     pass
    201    Finish give_answer "... Velmora"  check_answer_status                   Solved     passed
    202    Finish give_up_and_restart        check_task_solvable                   Unsolved   failed (Solvable)
    203    a tool call (no Finish)           nothing                               Unsolved   failed
    204    Finish give_answer "maybe ..."    check_answer_status, parse_answer...  Solved     passed
    each repeat: (1 + 0 + 0 + 1) / 4 = 50.0 %, std 0; majority pass rate 2 / 4 = 50.0 %
"""
import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest

import env
import eval as ev
from harness import evaluate as cli  # eval.py's command line
from harness import formats
from harness import judge as J

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ANSWERS = os.path.join(HERE, "fixtures", "stb_converted_G1_instruction.json")
S, U, N = "AnswerStatus.Solved", "AnswerStatus.Unsure", "AnswerStatus.Unsolved"


# ---- a fake OpenAI-compatible judge -----------------------------------------------------------
@pytest.fixture
def fake_judge(fake_openai):
    """conftest's fake endpoint with behave(body) (the request count unused); srv.bodies: what was asked."""
    return lambda behave: fake_openai(lambda n, body: behave(body))


def called(args, name=None):
    """A reply that makes the function call the request forced."""
    return {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}}]}


def asked(body):
    return body["tool_choice"]["function"]["name"], body["messages"][0]["content"]


def statuses(answer="Solved", process="Solved", task="Solvable"):
    """A judge that answers each question with a fixed status."""
    def behave(body):
        name, _ = asked(body)
        key, value = {"check_answer_status": ("answer_status", answer), "parse_answer_status": ("answer_status", process),
                      "check_task_solvable": ("task_status", task)}[name]
        return 200, called({key: value, "reason": f"{name} says {value}"}, name), 0
    return behave


def by_rule(body):
    """The fixture's judge (module docstring)."""
    name, text = asked(body)
    if name == "check_task_solvable":
        return 200, called({"task_status": "Solvable", "reason": "the tools fit"}, name), 0
    status = ("Solved" if "Velmora" in text and "maybe" not in text else "Unsure" if "maybe" in text else "Unsolved") \
        if name == "check_answer_status" else ("Solved" if "temp_c" in text else "Unsolved")
    return 200, called({"answer_status": status, "reason": "by rule"}, name), 0


def judge_at(url, **kw):
    return J.PassRateJudge(url, "judge-model", **{"backoff": 0, **kw})


EXAMPLES = formats.load_answers(ANSWERS)
SOLVED, GIVE_UP, NO_FINISH, UNSURE = (EXAMPLES[q] for q in ("201", "202", "203", "204"))
RNG = random.Random(0)


# ---- the decision chain, a test per branch ----------------------------------------------------
def test_a_final_step_that_is_not_a_finish_call_fails_and_nothing_is_asked(fake_judge):
    srv, url = fake_judge(statuses())
    j = judge_at(url).judge(NO_FINISH, RNG)
    assert (j["status"], j["pass_label"]) == (N, "failed") and srv.bodies == []


@pytest.mark.parametrize("final", ["", '{"return_type": "give_up_and_restart"}'])
def test_an_empty_or_given_up_answer_is_unsolved_unasked_then_its_solvability_decides(fake_judge, final):
    srv, url = fake_judge(statuses(task="Unsolvable"))
    example = {**GIVE_UP, "answer": {**GIVE_UP["answer"], "final_answer": final}}
    j = judge_at(url).judge(example, RNG)
    assert [asked(b)[0] for b in srv.bodies] == ["check_task_solvable"]
    assert (j["status"], j["task_status"], j["pass_label"]) == (N, "TaskStatus.Unsolvable", "passed")


def test_a_solved_answer_passes_without_the_solvability_question(fake_judge):
    srv, url = fake_judge(statuses(answer="Solved"))
    j = judge_at(url).judge(SOLVED, RNG)
    assert [asked(b)[0] for b in srv.bodies] == ["check_answer_status"]
    assert (j["status"], j["pass_label"], j["coin"]) == (S, "passed", "")
    assert "In Velmora it is sunny" in asked(srv.bodies[0])[1]              # the final answer is what it reads


def test_an_unsure_answer_is_judged_again_on_the_whole_process(fake_judge):
    srv, url = fake_judge(statuses(answer="Unsure", process="Unsolved", task="Solvable"))
    j = judge_at(url).judge(UNSURE, RNG)
    assert [asked(b)[0] for b in srv.bodies] == ["check_answer_status", "parse_answer_status", "check_task_solvable"]
    process = asked(srv.bodies[1])[1]
    assert "answer_details" in process and "forecast_for_skycast" in process and "sunny" in process
    assert (j["status"], j["pass_label"]) == (N, "failed")
    assert "parse_answer_status says Unsolved" in j["reason"] and "check_task_solvable" in j["reason"]


@pytest.mark.parametrize("answer, task, label", [
    ("Unsolved", "Solvable", "failed"), ("Unsolved", "Unsolvable", "passed"), ("Unsure", "Unsolvable", "passed"),
    ("Unsolved", "Unsure", None), ("Unsure", "Solvable", None), ("Unsure", "Unsure", None)])
def test_pass_or_fail_follows_answer_and_task_status_and_the_rest_is_a_coin_flip(fake_judge, answer, task, label):
    _, url = fake_judge(statuses(answer=answer, process=answer, task=task))
    j = judge_at(url).judge(SOLVED, random.Random(7))
    assert j["status"] == f"AnswerStatus.{answer}" and j["task_status"] == f"TaskStatus.{task}"
    if label:
        assert (j["pass_label"], j["coin"]) == (label, "")
    else:                                                               # the coin is recorded and is the label
        assert j["coin"] == j["pass_label"] == ("passed" if random.Random(7).random() < 0.5 else "failed")


def test_coin_flips_are_seeded_per_query_and_repeat_recorded_and_fair(fake_judge):
    _, url = fake_judge(statuses(answer="Unsure", process="Unsure", task="Unsure"))
    items = [("G1_instruction", str(q), SOLVED) for q in range(200)]
    labels, errors = J.judge_answers(items, judge_at(url), repeats=2, seed=5, workers=4)
    again, _ = J.judge_answers(items, judge_at(url), repeats=2, seed=5, workers=1)
    other, _ = J.judge_answers(items, judge_at(url), repeats=2, seed=6, workers=4)
    assert errors == {} and labels == again != other                    # a function of (seed, group, query, repeat)
    coins = [c for e in labels["G1_instruction"].values() for c in e["coin"].values()]
    assert len(coins) == 400 and 160 < coins.count("passed") < 240


def test_across_repeats_a_query_passes_if_it_failed_no_more_often_than_it_passed():
    def entry(passed, failed):
        return {**formats.label_entry(SOLVED, [S] * (passed + failed)), "passed": passed, "failed": failed}
    m = ev.score_labels({"tie": entry(1, 1), "more": entry(2, 1), "less": entry(1, 2), "none": entry(0, 3)})
    assert m["majority_pass_rate"] == pytest.approx(50.0)               # tie and more pass
    assert ev.score_labels({"a": formats.label_entry(SOLVED, [S])})["majority_pass_rate"] is None  # no votes: none


def test_each_question_is_a_forced_function_call_at_temperature_zero_with_a_reason(fake_judge):
    srv, url = fake_judge(statuses())
    judge_at(url).judge(SOLVED, RNG)
    body = srv.bodies[0]
    fn = body["tools"][0]["function"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert body["tool_choice"] == {"type": "function", "function": {"name": "check_answer_status"}}
    assert fn["name"] == "check_answer_status" and set(fn["parameters"]["required"]) == {"answer_status", "reason"}
    assert fn["parameters"]["properties"]["answer_status"]["enum"] == ["Solved", "Unsure", "Unsolved"]


# ---- judge failures are never a score ---------------------------------------------------------
MALFORMED = {
    "prose, no call": (200, {"choices": [{"message": {"role": "assistant", "content": "It looks solved to me."}}]}, 0),
    "status out of its enum": (200, called({"answer_status": "Mostly", "reason": "?"}, "check_answer_status"), 0),
    "arguments not JSON": (200, {"choices": [{"message": {"tool_calls": [{"function": {"name": "check_answer_status",
                                                                                       "arguments": "{answer_status: Sol"}}]}}]}, 0),
    "no choices": (200, {"error": "quota"}, 0),
    "http 500": (500, b'{"error": "overloaded"}', 0),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_failing_judge_is_retried_then_its_query_is_a_judge_error_never_a_score(fake_judge, kind):
    srv, url = fake_judge(lambda body: MALFORMED[kind])
    labels, errors = J.judge_answers([("G1_instruction", "201", SOLVED)], judge_at(url, retries=2), repeats=3)
    assert labels == {} and list(errors["G1_instruction"]) == ["201"]
    assert len(srv.bodies) == 3                                           # 1 try + 2 retries, then no other repeat
    assert f"judge at {url}/chat/completions failed 3 times" in errors["G1_instruction"]["201"]


def test_a_judge_that_times_out_fails_within_its_time_limit(fake_judge):
    srv, url = fake_judge(lambda body: (200, called({"answer_status": "Solved"}, "check_answer_status"), 2.0))
    t0 = time.perf_counter()
    with pytest.raises(J.JudgeError, match="Timeout"):
        judge_at(url, timeout=0.2, retries=1).judge(SOLVED, RNG)
    assert time.perf_counter() - t0 < 1.5 and len(srv.bodies) == 2


def test_a_query_that_fails_at_a_later_repeat_is_a_judge_error_as_a_whole(fake_judge):
    srv, url = fake_judge(lambda body: (200, called({"answer_status": "Solved"}, "check_answer_status"), 0)
                          if len(srv.bodies) <= 1 else MALFORMED["http 500"])
    labels, errors = J.judge_answers([("G1_instruction", "201", SOLVED)], judge_at(url, retries=0), repeats=3)
    assert labels == {} and "HTTP 500" in errors["G1_instruction"]["201"]


def closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def test_a_dead_facts_judge_makes_a_judge_error_not_an_unsure_half():
    task = env.Task(7, "q", [], [], "G1_instruction", {})             # no answer facts: the judge decides
    traj = env.Trajectory(7, "q", "G1_instruction", [env.Step("...", "Finish", {"return_type": "give_answer",
                          "final_answer": "42"})], "give_answer", "42", "finish")
    errors = {}
    labels, scored, groups = J.evaluate([traj], [task], J.FactsJudge(f"http://127.0.0.1:{closed_port()}/v1", "m",
                                                                       retries=0), repeats=3, workers=1, errors=errors)
    (_, _, m), = scored
    assert labels == {} and m["pass_rate"] is None and m["n"] == 0 and m["judge_errors"] == 1
    assert "failed 1 times" in errors["G1_instruction"]["7"]            # was: Pass Rate 50.0


# ---- StableToolBench's prompts from --stb-dir ---------------------------------------------------
TEMPLATE = """<function>
<name>check_answer_status</name>
<description>
TEST TEMPLATE answer. Q={query} A={answer}
</description>
</function>
<function>
<name>parse_answer_status</name>
<description>TEST TEMPLATE process. Q={query} A={answer}</description>
</function>
<function>
<name>check_task_solvable</name>
<description>TEST TEMPLATE task. T={task}</description>
</function>
"""
CONFIG = """completions_kwargs:
  model: "some-model"
  functions:
""" + "".join(f"""    - name: "{n}"
      description: "CONFIG {n}"
      parameters:
        type: "object"
        properties:
          {k}:
            type: "string"
            enum: {list(v)}
        required: ["{k}"]
""" for n, (_, k, v) in J.ASKED.items())


def stb_checkout(tmp_path, template=TEMPLATE):
    d = tmp_path / "StableToolBench" / J.STB_EVALUATOR
    d.mkdir(parents=True)
    (d / "template.txt").write_text(template)
    (d / "config.yaml").write_text(CONFIG)
    return str(tmp_path / "StableToolBench")


def test_stb_dir_prompts_and_function_schemas_are_read_at_run_time(fake_judge, tmp_path):
    srv, url = fake_judge(statuses(answer="Unsure", process="Solved"))
    judge = judge_at(url, stb_dir=stb_checkout(tmp_path))
    judge.judge(UNSURE, RNG)
    text = asked(srv.bodies[0])[1]
    assert text.startswith("\nTEST TEMPLATE answer. Q=What is the weather") and "maybe sunny" in text
    assert asked(srv.bodies[1])[1].startswith("TEST TEMPLATE process.")
    assert srv.bodies[0]["tools"][0]["function"]["description"] == "CONFIG check_answer_status"
    assert judge.describe()["comparable_with_stabletoolbench"] is True


def test_a_stb_dir_without_the_three_questions_is_refused_naming_the_file(tmp_path):
    d = stb_checkout(tmp_path, TEMPLATE.split("<function>\n<name>check_task_solvable")[0])
    with pytest.raises(ValueError, match="template.txt.* no function check_task_solvable"):
        J.PassRateJudge("http://127.0.0.1:9/v1", "m", stb_dir=d)
    with pytest.raises(ValueError, match="no template.txt"):
        J.PassRateJudge("http://127.0.0.1:9/v1", "m", stb_dir=str(tmp_path / "nowhere"))


def test_without_stb_dir_our_prompts_follow_the_chain_and_say_not_comparable():
    judge = J.PassRateJudge("http://127.0.0.1:9/v1", "m")
    assert judge.describe()["prompts"] == J.NOT_COMPARABLE and judge.describe()["comparable_with_stabletoolbench"] is False
    for name, (fields, _, _) in J.ASKED.items():
        assert all("{" + f + "}" in J.OUR_PROMPTS[name] for f in fields)


# ---- eval.py --answers ----------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_answers_judges_converted_answers_as_computed_by_hand(fake_judge, tmp_path):
    srv, url = fake_judge(by_rule)
    out = tmp_path / "out"
    r = run_cli("--answers", ANSWERS, "--judge-url", url, "--judge-model", "judge-model", "--repeats", "2",
                "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["files"][ANSWERS] == {"pass_rate": 50.0, "pass_rate_std": 0.0, "n": 4, "repeats": 2, "recall": None}
    d = res["detail"][ANSWERS]
    assert d["answer_status"] == {"Solved": 4, "Unsure": 0, "Unsolved": 4} and d["majority_pass_rate"] == 50.0
    assert d["judge_errors"] == 0 and d["pass_rate_ci"][0] <= 50.0 <= d["pass_rate_ci"][1]
    assert res["judge"]["model"] == "judge-model" and res["judge"]["url"] == url + "/chat/completions"
    assert res["judge"]["prompts"] == J.NOT_COMPARABLE and J.NOT_COMPARABLE in r.stdout
    assert len(srv.bodies) == 2 * (1 + 1 + 0 + 2)                          # 201, 202, 203, 204 per repeat
    labels = json.loads((out / "G1_instruction.json").read_text())
    assert labels["204"]["is_solved"] == {"0": S, "1": S} and labels["202"]["task_status"]["0"] == "TaskStatus.Solvable"
    assert (labels["203"]["passed"], labels["203"]["failed"]) == (0, 2) and "reasons" in labels["201"]
    again, _, errors = cli.score_paths([str(out / "G1_instruction.json")])   # our label file, read as theirs
    assert errors == [] and again[0][2]["pass_rate"] == 50.0


def test_cli_answers_judges_a_label_file_again_ignoring_its_recorded_statuses(fake_judge, tmp_path):
    _, url = fake_judge(by_rule)
    entry = formats.label_entry(SOLVED, [N, N, N])                     # recorded Unsolved, answer says Velmora
    p = tmp_path / "G2_category_mymodel.json"
    p.write_text(json.dumps({"9": entry}))
    r = run_cli("--answers", str(p), "--judge-url", url, "--repeats", "1", "--out", str(tmp_path / "o"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["files"][str(p)]["pass_rate"] == 100.0


def test_cli_answers_with_a_dead_judge_reports_judge_errors_and_no_pass_rate(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    finished = tmp_path / "G1_instruction.json"
    finished.write_text(json.dumps({q: e for q, e in json.load(open(ANSWERS)).items() if q != "203"}))
    r = run_cli("--answers", str(finished), "--judge-url", url, "--judge-retries", "0", "--repeats", "3",
                "--out", str(tmp_path / "out"), "--json")
    assert r.returncode == 1 and url in r.stderr and "Traceback" not in r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["detail"][str(finished)]["judge_errors"] == 3 and res["files"][str(finished)]["n"] == 0
    assert res["files"][str(finished)]["pass_rate"] is None and res["groups"]["G1_instruction"]["pass_rate"] is None
    assert set(res["judge"]["errors"]["G1_instruction"]) == {"201", "202", "204"} and "JUDGE ERRORS: 3" in r.stdout
    # beside an answer that needs no judge (203: no Finish, failed), the rate is that answer's alone
    r = run_cli("--answers", ANSWERS, "--judge-url", url, "--judge-retries", "0", "--out", str(tmp_path / "o2"), "--json")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 1 and res["files"][ANSWERS]["n"] == 1 and res["detail"][ANSWERS]["judge_errors"] == 3


def test_model_path_with_a_judge_url_judges_stabletoolbench_tasks_with_the_chain(fake_judge, tmp_path, monkeypatch):
    tasks = formats.load_tasks(os.path.join(HERE, "fixtures", "stb_queries.json"))    # no answer facts: `auto` -> chain
    say = env.Step("Action: Finish", "Finish", {"return_type": "give_answer", "final_answer": "Velmora it is."})
    trajs = [env.Trajectory(t.query_id, t.query, t.group, [say], "give_answer", "Velmora it is.", "finish") for t in tasks]
    monkeypatch.setattr(cli, "evaluate_model", lambda a, tasks: trajs)             # the rollouts, without a model
    srv, url = fake_judge(by_rule)
    out = tmp_path / "out"
    code = ev.main(["--model", "tiny", "--tasks", os.path.join(HERE, "fixtures", "stb_queries.json"), "--judge-url", url,
                    "--repeats", "2", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    assert code == 0 and res["judge"]["kind"] == "stabletoolbench" and res["judge"]["seed"] == 0
    assert res["files"]["stb_queries.json"]["pass_rate"] == 100.0 and len(srv.bodies) == 2 * len(tasks)
    labels = json.loads((out / "stb_queries.json").read_text())
    assert labels[str(tasks[0].query_id)]["final_step"].startswith("Final step: {'name': 'Finish'")
    assert (out / "trajectories.jsonl").exists()


def test_cli_answers_refuses_a_bad_file_or_no_judge_before_asking(tmp_path):
    bad = tmp_path / "G1_tool.json"
    bad.write_text(json.dumps({"5": {"query": "q", "available_tools": [], "answer": {"final_answer": 3}}}))
    r = run_cli("--answers", str(bad), "--judge-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and f"{bad}: query 5" in r.stderr and not (tmp_path / "o").exists()
    r = run_cli("--answers", ANSWERS, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--judge-url" in r.stderr
