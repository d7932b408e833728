"""Specification of reward.py: the rules, the modes, the LLM judge (harness/judge.py, against a fake OpenAI-compatible
server on a loopback port), the TSV <-> JSONL round trip and the command line (python -m harness.annotate)."""
import json
from dataclasses import asdict
import os
import random
import re
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import env  # noqa: E402
import reward  # noqa: E402
from harness import annotate  # noqa: E402
from harness import formats  # noqa: E402
from harness import toolclient  # noqa: E402
from harness import judge as J  # noqa: E402
from harness import server  # noqa: E402

FIX = os.path.join(ROOT, "tests", "fixtures")
PYPATH = {**os.environ, "PYTHONPATH": ROOT}  # python -m harness.X from another folder
SHARED = os.path.join(ROOT, "..", "shared", "data", "steptool")
TASK = env.Task(7, "What is the weather and the air quality index in Velmora?",
                [{"name": "forecast_for_skycast", "description": "", "parameters": {}},
                 {"name": "air_quality_for_skycast", "description": "", "parameters": {}}],
                ["forecast_for_skycast", "air_quality_for_skycast"], "G2", {}, answer=["sunny", "42"])
WEATHER = {"city": "Velmora", "condition": "sunny", "temp_c": 12}
AIR = {"city": "Velmora", "aqi": 42, "level": "good"}
ANSWER = "In Velmora it is sunny, 12 degrees; the air quality index is 42 (good)."


def call(name, response, error=""):
    return env.Step(f"Action: {name}", name, {"city": "Velmora"}, "", {"error": error, "response": response})


def finish(answer=ANSWER):
    return env.Step("Action: Finish", "Finish", {"return_type": "give_answer", "final_answer": answer})


def episode(*steps):
    """A trajectory as env.ToolEnv records it; its finish and final answer are read off a last Finish step."""
    kind = steps[-1].arguments.get("return_type") if steps and steps[-1].name == "Finish" else None
    return env.Trajectory(TASK.query_id, TASK.query, TASK.group, list(steps),
                          {"give_answer": "give_answer", "give_up_and_restart": "give_up"}.get(kind, ""),
                          steps[-1].arguments.get("final_answer", "") if kind else "", "finish" if kind else "max_steps")


# ---- SuccCalling ------------------------------------------------------------------------------
RECORDS = json.load(open(os.path.join(FIX, "reward_records.json"), encoding="utf-8"))


@pytest.mark.parametrize("case", RECORDS, ids=[c["case"] for c in RECORDS])
def test_succ_calling_reads_stabletoolbench_records_as_documented(case):
    assert reward.succ_calling(env.Step("t", "some_api", {}, "", case["record"])) == case["succ"]


def test_succ_calling_is_zero_without_a_parsed_offered_call():
    unparsed = env.Step("I will look.", error="Parse error: no 'Action:' line.")
    unknown = env.Step("Action: lookup_all", "lookup_all", error="No such function name: lookup_all")
    ok = call("forecast_for_skycast", WEATHER)
    assert reward.succ_calling(unparsed) == reward.succ_calling(unknown) == 0
    assert reward.succ_calling(finish()) == 0
    assert reward.succ_calling(ok, offered={"air_quality_for_skycast"}) == 0
    assert reward.succ_calling(ok, offered={"forecast_for_skycast"}) == reward.succ_calling(ok) == 1


# ---- Contribution -----------------------------------------------------------------------------
def test_lcs_length_equals_the_quadratic_table_on_random_strings():
    rng = random.Random(0)
    for _ in range(500):
        alphabet = "abcd"[:rng.randrange(1, 5)]
        a, b = ("".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40))) for _ in range(2))
        assert reward.lcs_length(a, b) == reward.lcs_table(a, b)
    assert reward.lcs_length("ABCBDAB", "BDCABA") == 4 and reward.lcs_length("", "abc") == 0


def test_contribution_is_lcs_over_response_length_thresholded_or_continuous():
    step = call("forecast_for_skycast", "sunny, 12C")
    ratio = reward.lcs_table("sunny, 12C", "It is sunny, 12 degrees.") / len("sunny, 12C")  # 9 / 10
    assert reward.contribution(step, "It is sunny, 12 degrees.", threshold=None) == pytest.approx(ratio)
    assert reward.contribution(step, "It is sunny, 12 degrees.") == 1.0
    assert reward.contribution(step, "It is sunny, 12 degrees.", threshold=0.95) == 0.0
    assert reward.contribution(call("forecast_for_skycast", "zzzzzzzzzz"), "It is sunny.") == 0.0
    assert reward.contribution(step, "") == 0.0


def test_failed_calls_and_empty_responses_contribute_nothing():
    failed = call("forecast_for_skycast", {"status": 404, "message": "No city named 'Velmora ' was found."})
    assert reward.contribution(failed, "No city named 'Velmora ' was found.", threshold=None) == 0.0
    assert reward.contribution(call("forecast_for_skycast", ""), ANSWER) == 0.0


def test_contribution_reads_only_the_first_1024_characters_of_a_response():
    step = call("search_for_news", "x" * 1024 + "the answer")
    assert reward.contribution(step, "the answer", threshold=None) == 0.0
    assert reward.contribution(step, "x" * 512, threshold=None) == pytest.approx(0.5)


def test_step_rewards_read_each_response_as_far_as_the_runs_obs_chars_showed_it():
    """The policy saw each tool response cut to --obs-chars: Contribution reads the same characters."""
    wide = episode(call("forecast_for_skycast", "x" * 20 + " sunny 42 Velmora"), finish("sunny 42 Velmora"))
    assert reward.step_rewards(TASK, wide, obs_chars=4096)[0] == pytest.approx(1.0)
    assert reward.step_rewards(TASK, wide, obs_chars=10)[0] == pytest.approx(0.5)    # only the x's were seen
    rewards, _ = reward.shape_batch([TASK], [wide], obs_chars=10)
    assert rewards[0][0] == pytest.approx(0.5)


# ---- IsSolved ---------------------------------------------------------------------------------
def test_is_solved_by_answer_facts_all_some_none():
    steps = [call("forecast_for_skycast", WEATHER)]
    assert reward.is_solved(TASK, episode(*steps, finish("SUNNY, aqi 42"))) == 1.0  # case-insensitive
    assert reward.is_solved(TASK, episode(*steps, finish("sunny"))) == 0.5
    assert reward.is_solved(TASK, episode(*steps, finish("rainy"))) == 0.0


def test_give_up_and_no_finish_are_unsolved():
    up = env.Step("Action: Finish", "Finish", {"return_type": "give_up_and_restart"})
    assert reward.is_solved(TASK, episode(call("forecast_for_skycast", WEATHER), up)) == 0.0
    assert reward.is_solved(TASK, episode(call("forecast_for_skycast", WEATHER))) == 0.0


def test_a_task_without_facts_and_without_a_judge_counts_an_answer_as_unsure():
    stb = env.Task(1, TASK.query, TASK.functions, [], "G1_instruction", {})
    assert reward.is_solved(stb, episode(call("forecast_for_skycast", WEATHER), finish())) == 0.5
    assert reward.is_solved(stb, episode(call("forecast_for_skycast", WEATHER), finish(""))) == 0.0


# ---- modes ------------------------------------------------------------------------------------
def test_stepgrained_rewards_follow_the_equation_by_hand():
    bad = call("air_quality_for_skycast", {"status": 404, "message": "No city named 'Velmra' was found."})
    traj = episode(call("forecast_for_skycast", WEATHER), bad, call("air_quality_for_skycast", AIR), finish())
    c1 = reward.contribution(traj.steps[0], ANSWER)
    c3 = reward.contribution(traj.steps[2], ANSWER)
    assert (c1, c3) == (1.0, 1.0)
    assert reward.step_rewards(TASK, traj) == [(1 + c1) / 2, 0.0, (1 + c3) / 2, 1.0]
    ratio = reward.contribution(traj.steps[0], ANSWER, threshold=None)
    got = reward.step_rewards(TASK, traj, alpha=2.0, contribution_threshold=None)
    assert got[0] == pytest.approx((2 * 1 + ratio) / 3) and got[1] == 0.0 and got[3] == 1.0


def test_final_mode_gives_zeros_then_is_solved():
    traj = episode(call("forecast_for_skycast", WEATHER), call("air_quality_for_skycast", AIR), finish("sunny"))
    assert reward.step_rewards(TASK, traj, mode="final") == [0.0, 0.0, 0.5]


def test_an_episode_without_finish_puts_its_zero_final_reward_on_the_last_step():
    traj = episode(call("forecast_for_skycast", WEATHER), call("air_quality_for_skycast", AIR))
    assert reward.step_rewards(TASK, traj) == [0.5, 0.5]  # succeeded, no answer to contribute to
    assert reward.step_rewards(TASK, traj, mode="final") == [0.0, 0.0]
    assert reward.step_rewards(TASK, episode()) == []


def test_a_users_reward_function_is_found_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def half(task, traj):\n    return [0.5] * len(traj.steps)\n"
                                            "def short(task, traj):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    traj = episode(call("forecast_for_skycast", WEATHER), finish())
    assert reward.step_rewards(TASK, traj, mode="my_rewards.half") == [0.5, 0.5]
    with pytest.raises(ValueError, match="1 rewards for 2 steps"):
        reward.step_rewards(TASK, traj, mode="my_rewards.short")
    with pytest.raises(ValueError, match="unknown reward mode"):
        reward.step_rewards(TASK, traj, mode="stepgrainy")


def test_shape_batch_returns_rewards_and_counters():
    good = episode(call("forecast_for_skycast", WEATHER), call("air_quality_for_skycast", AIR), finish())
    up = env.Step("Action: Finish", "Finish", {"return_type": "give_up_and_restart"})
    bad = episode(call("forecast_for_skycast", ""), up)
    rewards, stats = reward.shape_batch([TASK, TASK], [good, bad])
    assert rewards == [reward.step_rewards(TASK, good), reward.step_rewards(TASK, bad)]
    assert (stats["episodes"], stats["steps"], stats["judged"], stats["judge_fallbacks"]) == (2, 5, 0, 0)
    assert stats["succ_calling"] == pytest.approx(2 / 3) and stats["is_solved"] == 0.5


def test_expert_replays_earn_full_rewards_and_a_wrong_city_earns_none():
    tasks = formats.load_tasks(os.path.join(ROOT, "data", "bench_train.json"))[:12]
    srv = server.start_in_thread()
    try:
        client, trajs = toolclient.ToolClient(srv.url), []
        for task in tasks:
            e = env.ToolEnv(client)
            e.reset(task)
            for s in task.expert:
                e.step(env.format_action(s["thought"], s["name"], s["arguments"]))
            trajs.append(e.traj)
        e = env.ToolEnv(client)
        e.reset(tasks[0])
        first = tasks[0].expert[0]
        e.step(env.format_action("", first["name"], {k: "Nowhere" for k in first["arguments"]}))
    finally:
        srv.shutdown()
    rewards, stats = reward.shape_batch(tasks, trajs)
    assert stats["succ_calling"] == 1.0 and all(r[-1] == 1.0 for r in rewards)
    assert all(x >= 0.5 for r in rewards for x in r)
    assert reward.step_rewards(tasks[0], e.traj) == [0.0]


# ---- annotations ------------------------------------------------------------------------------
def test_annotations_average_repeats_then_apply_the_equation():
    ann = json.load(open(os.path.join(FIX, "reward_annotation.json")))
    # query 7: success (1+1)/2, (1+0)/2; contribution (5+4)/10, (4+2)/10; status (1 + 0.5)/2
    assert annotate.annotation_rewards(ann["7"]) == pytest.approx([(1 + 0.9) / 2, (0.5 + 0.6) / 2, 0.75])
    assert annotate.annotation_rewards(ann["8"]) == pytest.approx([(0 + 0.1) / 2, 0.0])
    assert annotate.annotation_rewards(ann["7"], alpha=3)[0] == pytest.approx((3 + 0.9) / 4)


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "reward_annotation_example.json")), reason="no ../shared")
def test_the_released_annotation_example_gets_the_rewards_in_the_note():
    ann = json.load(open(os.path.join(SHARED, "reward_annotation_example.json")))
    expected = {"32980": [1, 1, 14 / 15, 13 / 15, 1], "70195": [1, 13 / 15, 1], "44426": [1, 5 / 6],
                "34459": [1, 1, 1], "56543": [2 / 15, 13 / 30, 1 / 3]}
    assert {q: annotate.annotation_rewards(a) for q, a in ann.items()} == {q: pytest.approx(r) for q, r in expected.items()}


# ---- the LLM judge ----------------------------------------------------------------------------
def chat(content=None, tool_args=None):
    msg = {"role": "assistant", "content": content}
    if tool_args is not None:
        msg["tool_calls"] = [{"type": "function", "function": {"name": "annotate", "arguments": tool_args}}]
    return {"choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}


JUDGED = episode(call("forecast_for_skycast", WEATHER), call("air_quality_for_skycast", ""), finish())
STB = env.Task(7, TASK.query, TASK.functions, [], "G2_instruction", {})  # no answer facts: the judge grades


def test_judge_good_replies_are_averaged_over_repeats(fake_openai, monkeypatch, capsys):
    replies = ['```json\n{"steps": [{"success": 1, "contribution": 5}, {"success": 0, "contribution": 0}], "status": "Solved"}\n```',
               'Here you go: {"steps": [{"success": 1, "contribution": 3}, {"success": 1, "contribution": 1}], "status": "Unsure"}']
    srv, url = fake_openai(lambda n, body: (200, chat(replies[(n - 1) % 2]), 0))
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
    judge = J.Judge(url, "judge-model", key_env="MY_JUDGE_KEY", repeats=2, backoff=0)
    rewards, stats = reward.shape_batch([STB], [JUDGED], judge=judge)
    # success (1+1)/2, (0+1)/2; contribution (5+3)/10, (0+1)/10; status (1 + 0.5)/2
    assert rewards == [pytest.approx([(1 + 0.8) / 2, (0.5 + 0.1) / 2, 0.75])]
    assert (stats["judged"], stats["judge_fallbacks"]) == (1, 0)
    assert len(srv.seen) == 2 and srv.seen[0]["path"] == "/v1/chat/completions"
    assert srv.seen[0]["auth"] == "Bearer sk-secret-123" and srv.seen[0]["body"]["model"] == "judge-model"
    assert "sunny" in srv.seen[0]["body"]["messages"][1]["content"]  # the tool responses are shown
    assert "sk-secret" not in repr(judge) + str(vars(judge)) + "".join(capsys.readouterr())


def test_judge_function_call_replies_are_parsed(fake_openai):
    args = json.dumps({"steps": [{"success": 1, "contribution": 5}, {"success": 0, "contribution": 0}], "status": "Unsolved"})
    srv, url = fake_openai(lambda n, body: (200, chat(None, tool_args=args), 0))
    judge = J.Judge(url, "m", key_env="NO_SUCH_KEY_VARIABLE", repeats=1, backoff=0)
    assert reward.step_rewards(STB, JUDGED, judge=judge) == [1.0, 0.0, 0.0]
    assert srv.seen[0]["auth"] is None  # no key in the environment: no Authorization header


def test_judge_answer_facts_still_decide_is_solved(fake_openai):
    reply = '{"steps": [{"success": 1, "contribution": 5}, {"success": 1, "contribution": 5}], "status": "Unsolved"}'
    _, url = fake_openai(lambda n, body: (200, chat(reply), 0))
    assert reward.step_rewards(TASK, JUDGED, judge=J.Judge(url, "m", repeats=1)) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("kind", ["garbage", "wrong step count", "http 500"])
def test_a_failing_judge_is_retried_then_the_rules_shape_that_episode(fake_openai, kind):
    reply = {"garbage": (200, chat("I think the assistant did fine."), 0),
             "wrong step count": (200, chat('{"steps": [{"success": 1, "contribution": 5}], "status": "Solved"}'), 0),
             "http 500": (500, b'{"error": "overloaded"}', 0)}[kind]
    srv, url = fake_openai(lambda n, body: reply)
    judge = J.Judge(url, "m", repeats=3, retries=2, backoff=0)
    rewards, stats = reward.shape_batch([STB], [JUDGED], judge=judge)
    assert rewards == [reward.step_rewards(STB, JUDGED)]  # the rules
    assert (stats["judged"], stats["judge_fallbacks"]) == (0, 1)
    assert len(srv.seen) == 3  # 1 try + 2 retries, then the episode falls back


def test_a_judge_that_times_out_falls_back_within_its_time_limit(fake_openai):
    srv, url = fake_openai(lambda n, body: (200, chat("{}"), 2.0))
    judge = J.Judge(url, "m", repeats=3, timeout=0.2, retries=1, backoff=0)
    t0 = time.perf_counter()
    rewards, stats = reward.shape_batch([STB], [JUDGED], judge=judge)
    assert time.perf_counter() - t0 < 1.5 and len(srv.seen) == 2
    assert rewards == [reward.step_rewards(STB, JUDGED)] and stats["judge_fallbacks"] == 1


def test_a_malformed_key_never_reaches_the_error_messages(fake_openai, monkeypatch, capsys):
    srv, url = fake_openai(lambda n, body: (200, chat("{}"), 0))
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret\r\n456")  # requests quotes such a header in its error
    judge = J.Judge(url, "m", key_env="MY_JUDGE_KEY", repeats=1, retries=0)
    with pytest.raises(J.JudgeError) as e:
        judge.annotate(STB, JUDGED)
    assert "InvalidHeader" in str(e.value) and "sk-secret" not in str(e.value)
    _, stats = reward.shape_batch([STB], [JUDGED], judge=judge)
    assert stats["judge_fallbacks"] == 1 and "sk-secret" not in "".join(capsys.readouterr())


def test_parse_judge_reply_rejects_out_of_range_values():
    for bad in ('{"steps": [{"success": 2, "contribution": 1}], "status": "Solved"}',
                '{"steps": [{"success": 1, "contribution": 6}], "status": "Solved"}',
                '{"steps": [{"success": 1, "contribution": 1}], "status": "Done"}', "no JSON here"):
        with pytest.raises((ValueError, KeyError, TypeError)):
            J.parse_judge_reply(chat(bad), 1)
    ok = '{"steps": [{"success": true, "contribution": "4"}], "status": "AnswerStatus.Unsure"}'
    assert J.parse_judge_reply(chat(ok), 1) == ([1], [4.0], "Unsure")


# ---- the original's TSV -----------------------------------------------------------------------
def round_trip(src, tmp_path):
    formats.convert(src, str(tmp_path / "t.jsonl"))
    formats.convert(str(tmp_path / "t.jsonl"), str(tmp_path / "back.tsv"))
    return formats.read_tsv(src), formats.read_tsv(str(tmp_path / "back.tsv")), tmp_path / "back.tsv"


def test_tsv_to_jsonl_to_tsv_reproduces_every_list_exactly(tmp_path):
    src = os.path.join(FIX, "reward_steptool.tsv")
    before, after, back = round_trip(src, tmp_path)
    assert after == before and [type(x) for r in after for x in r["reward"]] == [type(x) for r in before for x in r["reward"]]
    assert back.read_bytes() == open(src, "rb").read()


def test_tsv_rows_become_trajectories_the_rules_can_shape(tmp_path):
    formats.convert(os.path.join(FIX, "reward_steptool.tsv"), str(tmp_path / "t.jsonl"))
    rows = [json.loads(line) for line in open(tmp_path / "t.jsonl")]
    trajs = [formats.trajectory({k: r[k] for k in r if k not in ("rewards", "prompt", "response")}) for r in rows]
    assert [t.finish for t in trajs] == ["give_answer", "give_up", "give_answer"]
    assert trajs[0].query == "What is the weather and the air quality index in Velmora?"
    assert trajs[0].steps[0].record == {"error": "", "response": WEATHER} and trajs[0].final_answer.startswith("Velmora is sunny")
    assert trajs[1].steps[1].record["response"].endswith("...")  # a cut observation keeps its text
    assert trajs[2].steps[0].error.startswith("Parse error")
    assert [reward.succ_calling(s) for s in trajs[1].steps[:2]] == [0, 1]
    stb = [env.Task(t.query_id, t.query, [], [], "tsv", {}) for t in trajs]
    assert reward.shape_batch(stb, trajs)[0] == [[1.0, 1.0, 0.5], [0.0, 0.5, 0.0], [0.0, 0.5]]


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED, "step_grained_for_ppo_example.qwen2.tsv")), reason="no ../shared")
def test_the_released_training_tsv_survives_the_round_trip(tmp_path):
    src = os.path.join(SHARED, "step_grained_for_ppo_example.qwen2.tsv")
    before, after, back = round_trip(src, tmp_path)
    assert len(before) == 10 and after == before and back.read_bytes() == open(src, "rb").read()


def test_read_tsv_rejects_malformed_rows_naming_file_and_line(tmp_path):
    good = "['p']\t['r']\t[1.0]"
    for body, line, what in [(f"{good}\n['p']\t['r']\n", 3, "3 tab-separated"),
                             (f"{good}\n__import__('os').system('touch {tmp_path}/pwned')\t['r']\t[1.0]\n", 3, "Python-literal"),
                             (f"{good}\n['p', 'q']\t['r']\t[1.0]\n", 3, "equal length"),
                             (f"{good}\n['p', 'q']\t['r', '']\t[1.0, 0.5]\n", 3, "response 1 is empty"),
                             (f"{good}\n['p']\t['r']\t['high']\n", 3, "numbers")]:
        (tmp_path / "bad.tsv").write_text("prompt\tresponse\treward\n" + body)
        with pytest.raises(ValueError, match=f"bad.tsv:{line}: .*{what}"):
            formats.read_tsv(str(tmp_path / "bad.tsv"))
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "bad.tsv").write_text("prompt\tresponses\treward\n")
    with pytest.raises(ValueError, match="bad.tsv:1: the header"):
        formats.read_tsv(str(tmp_path / "bad.tsv"))


def test_our_trajectories_render_as_qwen2_training_rows():
    task = formats.load_tasks(os.path.join(ROOT, "data", "bench_train.json"))[0]
    steps = [env.Step(env.format_action("", s["name"], s["arguments"]), s["name"], s["arguments"], f'{{"obs": {i}}}')
             for i, s in enumerate(task.expert)]
    d = {**asdict(env.Trajectory(task.query_id, task.query, task.group, steps, "give_answer", "x", "finish")),
         "rewards": [0.5] * len(steps)}
    row = formats.traj_to_tsv_row(d, {task.query_id: task})
    system, user = (m["content"] for m in env.initial_messages(task))
    assert row["prompt"][0] == (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                                "<|im_start|>assistant\n")
    assert row["prompt"][1] == '<|im_start|>function\n{"obs": 0}<|im_end|>\n<|im_start|>assistant\n'
    assert row["response"] == [s.text + "<|im_end|>\n" for s in steps] and row["reward"] == d["rewards"]
    with pytest.raises(ValueError, match="task files"):
        formats.traj_to_tsv_row(d, {})


# ---- command line -----------------------------------------------------------------------------
def test_command_line_annotate_convert_and_bench(tmp_path):
    tasks = formats.load_tasks(os.path.join(ROOT, "data", "bench_train.json"))[:3]
    srv = server.start_in_thread()
    try:
        with open(tmp_path / "trajs.jsonl", "w") as f:
            for task in tasks:
                e = env.ToolEnv(toolclient.ToolClient(srv.url))
                e.reset(task)
                for s in task.expert:
                    e.step(env.format_action(s["thought"], s["name"], s["arguments"]))
                f.write(json.dumps(asdict(e.traj)) + "\n")
    finally:
        srv.shutdown()
    run = lambda *args: subprocess.run([sys.executable, "-m", "harness.annotate", *args], cwd=tmp_path, env=PYPATH,
                                       capture_output=True, text=True, timeout=60)
    out = run("annotate", "--in", "trajs.jsonl", "--out", "annotated.jsonl")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in open(tmp_path / "annotated.jsonl")]
    assert all(r["rewards"][-1] == 1.0 and len(r["rewards"]) == len(r["steps"]) for r in rows)
    out = run("convert", "--in", "annotated.jsonl", "--out", "train.tsv")
    assert out.returncode == 0, out.stderr
    assert [r["reward"] for r in formats.read_tsv(str(tmp_path / "train.tsv"))] == [r["rewards"] for r in rows]
    out = run("convert", "--in", "trajs.jsonl", "--out", "train.tsv")
    assert out.returncode != 0 and "trajs.jsonl:1" in out.stderr and "annotate" in out.stderr
    out = run("bench", "--n", "20", "--runs", "1")
    assert out.returncode == 0 and "ms per episode" in out.stdout and "bit-parallel" in out.stdout, out.stderr


# ---- bad input: one line naming the file (and line), status 2, before any work ----------------
def refused(capsys, *argv):
    """annotate.main(argv) -> its one stderr line; it must exit with status 2 (any other exception is a traceback)."""
    with pytest.raises(SystemExit) as e:
        annotate.main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


HEADER, ROW = "prompt\tresponse\treward\n", "['p']\t['r']\t[1.0]\n"
BAD_TSV = {"empty lists": ((HEADER + ROW + "[]\t[]\t[]\n").encode(), "bad.tsv:3: .*at least one step"),
           "infinite reward": ((HEADER + ROW + "['p']\t['r']\t[1e999]\n").encode(), "bad.tsv:3: .*finite"),
           "unequal lengths": ((HEADER + ROW + "['p', 'q']\t['r', 's']\t[1.0]\n").encode(), "bad.tsv:3: .*equal length"),
           "latin-1": ((HEADER + ROW + "['café']\t['r']\t[1.0]\n").encode("latin-1"), "bad.tsv:3: not UTF-8"),
           "utf-16": ((HEADER + ROW).encode("utf-16"), "bad.tsv:1: not UTF-8"),
           "header only": (HEADER.encode(), "bad.tsv: no trajectories"),
           "empty file": (b"", "bad.tsv: empty")}


@pytest.mark.parametrize("case", BAD_TSV)
def test_convert_refuses_a_bad_tsv_naming_file_and_line_and_writes_nothing(tmp_path, capsys, case):
    data, expected = BAD_TSV[case]
    (tmp_path / "bad.tsv").write_bytes(data)
    msg = refused(capsys, "convert", "--in", str(tmp_path / "bad.tsv"), "--out", str(tmp_path / "t.jsonl"))
    assert msg.startswith("harness.annotate convert: error: ") and re.search(expected, msg), msg
    assert not (tmp_path / "t.jsonl").exists()


def trajectory_line(**kw):
    d = {**asdict(env.Trajectory(1, "q", "tsv")), "prompt": ["p"], "response": ["r"], "rewards": [1.0], **kw}
    return json.dumps(d)


BAD_JSONL = {"rewards a string": (trajectory_line(rewards="x"), "bad.jsonl:2: rewards must be a list"),
             "infinite reward": (trajectory_line(rewards="INF").replace('"INF"', "[1e999]"), "bad.jsonl:2: .*finite"),
             "NaN reward": (trajectory_line(rewards="NAN").replace('"NAN"', "[NaN]"), "bad.jsonl:2: .*finite"),
             "unequal lengths": (trajectory_line(prompt=["p", "q"]), "bad.jsonl:2: .*equal length"),
             "no steps": (trajectory_line(prompt=[], response=[], rewards=[]), "bad.jsonl:2: .*at least one step"),
             "not JSON": ("{'rewards': [1.0]}", "bad.jsonl:2: not JSON"),
             "a list": ("[1, 2]", "bad.jsonl:2: an array, not a JSON object")}


@pytest.mark.parametrize("case", BAD_JSONL)
def test_convert_refuses_a_bad_jsonl_line_naming_file_and_line_and_writes_nothing(tmp_path, capsys, case):
    line, expected = BAD_JSONL[case]
    (tmp_path / "bad.jsonl").write_text(trajectory_line() + "\n" + line + "\n")
    msg = refused(capsys, "convert", "--in", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "t.tsv"))
    assert re.search(expected, msg), msg
    assert not (tmp_path / "t.tsv").exists()
    (tmp_path / "bad.jsonl").write_text("\n")
    assert "bad.jsonl: no trajectories" in refused(capsys, "convert", "--in", str(tmp_path / "bad.jsonl"),
                                                   "--out", str(tmp_path / "t.tsv"))


NOT_TRAJECTORIES = {"a list": ("[1, 2]", "an array"), "a string": ('"a string"', "a string"), "an int": ("7", "a number"),
                    "no query": ('{"query_id": 1}', "not a trajectory"),
                    "steps a string": ('{"query_id": 1, "query": "q", "group": "g", "steps": "abc"}', "not a trajectory"),
                    "answer null": ('{"query_id": 1, "query": "q", "group": "g", "final_answer": null}',
                                    "final_answer None is of the wrong type")}


@pytest.mark.parametrize("case", NOT_TRAJECTORIES)
def test_annotate_refuses_a_line_that_is_not_a_trajectory_naming_file_and_line(tmp_path, capsys, case):
    line, expected = NOT_TRAJECTORIES[case]
    (tmp_path / "in.jsonl").write_text(json.dumps(asdict(env.Trajectory(1, "q", "g"))) + "\n" + line + "\n")
    msg = refused(capsys, "annotate", "--in", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"))
    assert "in.jsonl:2: " in msg and expected in msg, msg
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("flags", [["--alpha", "-1"], ["--alpha", "nan"], ["--threshold", "1.5"],
                                   ["--judge-repeats", "0"], ["--judge-timeout", "0"], ["--judge-retries", "-1"],
                                   ["--workers", "0"], ["--mode", "stepgrainy"], ["--mode", "no_such_module_xyz.fn"],
                                   ["--judge-url", "http://127.0.0.1:9/v1"], ["--tasks", "no_such_tasks.json"]])
def test_annotate_refuses_a_flag_out_of_range_naming_it_before_reading(tmp_path, capsys, flags):
    (tmp_path / "in.jsonl").write_text(json.dumps(asdict(env.Trajectory(1, "q", "g"))) + "\n")
    msg = refused(capsys, "annotate", "--in", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"), *flags)
    assert flags[0] in msg, msg
    assert not (tmp_path / "out.jsonl").exists()


def test_read_tsv_and_read_jsonl_raise_one_error_class_naming_file_and_line(tmp_path):
    assert issubclass(formats.DataFileError, ValueError)
    (tmp_path / "bad.tsv").write_text(HEADER + ROW + "[]\t[]\t[]\n")
    with pytest.raises(formats.DataFileError, match=r"bad.tsv:3: "):
        formats.read_tsv(str(tmp_path / "bad.tsv"))
    with pytest.raises(formats.DataFileError, match=r"nosuch.tsv: cannot read"):
        formats.read_tsv(str(tmp_path / "nosuch.tsv"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(formats.DataFileError, match=r"bad.jsonl:2: not UTF-8"):
        formats.read_jsonl(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n7\n')
    with pytest.raises(formats.DataFileError, match=r"bad.jsonl:2: a number"):
        formats.read_jsonl(str(tmp_path / "bad.jsonl"))
    (tmp_path / "ok.tsv").write_bytes(b"\xef\xbb\xbf" + (HEADER + ROW).replace("\n", "\r\n").encode())
    assert formats.read_tsv(str(tmp_path / "ok.tsv")) == [{"prompt": ["p"], "response": ["r"], "reward": [1.0]}]


def test_a_reward_function_that_is_missing_or_not_finite_is_a_value_error(tmp_path, monkeypatch):
    (tmp_path / "my_bad_rewards.py").write_text("def nan(task, traj):\n    return [float('nan')] * len(traj.steps)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    traj = episode(call("forecast_for_skycast", WEATHER), finish())
    with pytest.raises(ValueError, match="not finite"):
        reward.step_rewards(TASK, traj, mode="my_bad_rewards.nan")
    for mode in ("no_such_module_xyz.fn", "my_bad_rewards.nope"):
        with pytest.raises(ValueError, match=mode):
            reward.step_rewards(TASK, traj, mode=mode)


@pytest.mark.parametrize("answer, fact, found", [
    ("status: cancelled, platform: 2", "2", True),
    ("train TR582 leaves", "2", False),            # a fact inside an id is no answer
    ("platform 12", "2", False),
    ("price 2.5", "2", False), ("price 1.2", "2", False),   # nor inside a number
    ("It is On Time.", "on time", True),          # case-insensitive, punctuation around it
    ("aqi: 42.", "42", True),
    ("the ticker is VENDOR", "VEND", False),
    ("", "2", False),
])
def test_answer_facts_match_at_token_boundaries_only(answer, fact, found):
    assert reward.mentions(answer, fact) is found


def test_is_solved_does_not_credit_a_fact_hidden_inside_another_token():
    task = env.Task(1, "q", [], [], "G1", {}, answer=["cancelled", "2"])
    assert reward.is_solved(task, episode(finish("cancelled, see TR582"))) == 0.5
    assert reward.is_solved(task, episode(finish("cancelled, platform 2"))) == 1.0
