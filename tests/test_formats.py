"""Specification of formats.py's StableToolBench side: converted answers (what its convert_to_answer_format.py
writes for the pass-rate evaluator), label entries with the judge's records, and the round trip between
label files and converted answers. (The StepTool TSV and our JSONL are specified in test_reward.py.)"""
import json
import os

import pytest

import env
from harness import formats

HERE = os.path.dirname(os.path.abspath(__file__))
ANSWERS = os.path.join(HERE, "fixtures", "stb_converted_G1_instruction.json")
SAMPLE = os.path.join(os.path.dirname(HERE), "..", "shared", "data", "stabletoolbench", "sample_pass_rate_labels.json")
S, N = "AnswerStatus.Solved", "AnswerStatus.Unsolved"
FS = [{"name": "forecast_for_skycast", "description": "today's weather", "parameters": {}}]
TASK = env.Task(7, "Weather in Velmora?", FS, ["forecast_for_skycast"], "G1_instruction", {})


def trajectory():
    call = env.Step("Thought: look it up.\nAction: forecast_for_skycast\nAction Input: {\"city\": \"Velmora\"}",
                    "forecast_for_skycast", {"city": "Velmora"}, '{"error": "", "response": "sunny"}',
                    {"error": "", "response": "sunny"})
    garbled = env.Step("I am not sure what to do.", error="Parse error: no 'Action:' line.", observation="...")
    answer = env.Step("Thought: done.\nAction: Finish\nAction Input: {\"return_type\": \"give_answer\", \"final_answer\": "
                      "\"Sunny.\"}", "Finish", {"return_type": "give_answer", "final_answer": "Sunny."})
    return env.Trajectory(7, TASK.query, TASK.group, [call, garbled, answer], "give_answer", "Sunny.", "finish")


def path_of(example):
    node, out = example["answer"]["answer_details"][0], []
    while node:
        out.append((node["role"], node["message"]))
        node = (node["next"] or [None])[0]
    return out


def test_our_trajectory_becomes_a_converted_answer_as_stabletoolbenchs_converter_writes_one():
    ex = formats.traj_to_example(TASK, trajectory())
    assert ex["query"] == TASK.query and [t["name"] for t in ex["available_tools"]] == ["forecast_for_skycast", "Finish"]
    assert path_of(ex) == [
        ("system", ""), ("user", ""), ("assistant", "look it up."),
        ("tool", {"name": "forecast_for_skycast", "arguments": '{"city": "Velmora"}',
                  "response": '{"error": "", "response": "sunny"}'}),
        ("assistant", "I am not sure what to do."),                       # no call: an assistant node, no tool node
        ("assistant", "done."),
        ("tool", {"name": "Finish", "arguments": '{"return_type": "give_answer", "final_answer": "Sunny."}', "response": ""})]
    # ToolBench's answers keep the Finish arguments as the final answer's text; its judge reads that text
    assert json.loads(ex["answer"]["final_answer"]) == {"return_type": "give_answer", "final_answer": "Sunny."}
    assert ex["answer"]["total_steps"] == 7


def test_the_steps_of_a_converted_answer_are_those_of_its_label_entry():
    traj = trajectory()
    steps, final = formats.answer_steps(formats.traj_to_example(TASK, traj))
    e = formats.to_label(TASK, traj, [S])
    assert (steps, final) == (e["answer_steps"], e["final_step"]) and e["length"] == 2
    assert steps.startswith("Step 1: {'name': 'forecast_for_skycast', 'arguments': '{\"city\": \"Velmora\"}', 'response':")
    assert "'name': 'Finish'" in final                                     # StableToolBench's test before judging


def test_a_label_entry_carries_each_repeats_status_reason_task_status_and_the_pass_counts():
    judged = [{"status": S, "reason": "r0", "task_status": "TaskStatus.Solvable", "pass_label": "passed", "coin": ""},
              {"status": N, "reason": "r1", "task_status": "TaskStatus.Unsure", "pass_label": "failed", "coin": "failed"}]
    e = formats.label_entry(formats.traj_to_example(TASK, trajectory()), [S, N], judged)
    assert e["is_solved"] == {"0": S, "1": N} and e["reasons"] == {"0": "r0", "1": "r1"}
    assert e["task_status"] == {"0": "TaskStatus.Solvable", "1": "TaskStatus.Unsure"}
    assert e["pass_label"] == {"0": "passed", "1": "failed"} and e["coin"] == {"1": "failed"}
    assert (e["passed"], e["failed"]) == (1, 1)                           # ToolBench's label counts


def test_load_answers_reads_converted_answers_and_label_files_alike(tmp_path):
    converted = formats.load_answers(ANSWERS)
    assert list(converted) == ["201", "202", "203", "204"]
    labels = {q: formats.label_entry(ex, [N]) for q, ex in converted.items()}
    p = tmp_path / "G1_instruction_ours.json"
    p.write_text(json.dumps(labels))
    again = formats.load_answers(str(p))
    for q, ex in converted.items():  # the steps survive; a label file offers the tool names only (departure 3)
        assert formats.answer_steps(again[q]) == formats.answer_steps(ex)
        assert [t["name"] for t in again[q]["available_tools"]] == [t["name"] for t in ex["available_tools"]]
    assert json.loads(again["201"]["answer"]["final_answer"])["return_type"] == "give_answer"
    assert again["203"]["answer"]["final_answer"] == ""                   # no Finish: no final answer


def test_a_truncated_step_stays_text_when_a_label_file_becomes_an_answer():
    e = {"query": "q", "tool_names": ["a_for_t"], "final_step": "Final step: {'name': 'a_for_t', 'argu",
         "answer_steps": "Step 1: {'name': 'a_for_t', 'argu"}
    ex = formats.label_to_example(e)
    assert path_of(ex)[2] == ("tool", "{'name': 'a_for_t', 'argu")
    assert formats.answer_steps(ex) == (e["answer_steps"], e["final_step"])


@pytest.mark.parametrize("entry, message", [
    ({"query": "q", "available_tools": [], "answer": {"final_answer": 3, "answer_details": []}}, "'final_answer'"),
    ({"query": "q", "available_tools": [{"description": "x"}], "answer": {"final_answer": "", "answer_details": []}},
     "needs a 'name'"),
    ({"available_tools": [], "answer": {"final_answer": "", "answer_details": []}}, "'query'"),
    ({"query": "q", "final_step": ""}, "missing 'answer_steps'"),
    ("an answer", "not a JSON object"),
], ids=["final_answer_not_text", "tool_without_name", "no_query", "label_without_steps", "not_an_object"])
def test_a_malformed_answer_file_is_an_error_naming_file_and_query(tmp_path, entry, message):
    p = tmp_path / "G1_tool.json"
    p.write_text(json.dumps({"42": entry}))
    with pytest.raises(formats.LabelFileError, match=message) as e:
        formats.load_answers(str(p))
    assert str(e.value).startswith(f"{p}: query 42")


def test_the_shared_label_sample_becomes_answers_whose_steps_are_its_own():
    if not os.path.exists(SAMPLE):
        pytest.skip("../shared is absent in a user's clone")
    labels = json.load(open(SAMPLE))
    answers = formats.load_answers(SAMPLE)
    for q, e in labels.items():
        assert formats.answer_steps(answers[q]) == (e["answer_steps"], e["final_step"])
        assert "'name': 'Finish'" not in e["final_step"]                  # none finished: the judge is never asked
