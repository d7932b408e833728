"""Specification of input files a careless or hostile user may give: each is refused whole, before any
work, as one line naming the file (and the item or query), never a traceback, a hang or a silent wrong
number. Every file goes through formats.py's one reader (read_input, read_json): a regular file only,
at most MAX_INPUT_BYTES, JSON nested at most MAX_JSON_DEPTH levels, no key twice in one object. Then
each loader checks its items: a group is a plain name (it becomes <group>.json), query ids and repeat
indices are integers that no two entries share, and every field the scorers read is of its type."""
import json
import os
import subprocess
import sys
import threading

import pytest

from harness import evaluate as cli  # eval.py's command line
from harness import formats
from conftest import ROOT, STB_QUERIES

S = "AnswerStatus.Solved"
FINISH = "Final step: {'name': 'Finish', 'arguments': '{\"return_type\": \"give_answer\"}', 'response': ''}"
LABELS = os.path.join(ROOT, "tests", "fixtures", "eval_G1_instruction.json")

# what reads a file -> the error it raises; each message starts with the file's path
LOADERS = {
    "task file": (formats.load_tasks, formats.TaskFileError),
    "label file": (formats.load_labels, formats.LabelFileError),
    "answer file": (formats.load_answers, formats.LabelFileError),
    "eval.py --answers": (lambda p: formats.read_answers([p]), formats.LabelFileError),
    "trajectory JSONL": (formats.read_trajectories, formats.DataFileError),
    "training TSV": (formats.read_tsv, formats.DataFileError),
}
JSON_LOADERS = [k for k in LOADERS if k != "training TSV"]


def refused(load, path, error):
    """load(path) must raise `error`: one line, starting with the path -> the message."""
    with pytest.raises(error) as e:
        load(str(path))
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    return msg


def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return p


def label(**fields):
    return {"query": "q", "tool_names": [], "answer_steps": "", "final_step": FINISH, "is_solved": {"0": S}, **fields}


def bench_file(tmp_path, *edits):
    """The embedded benchmark's train split cut to 3 tasks, task i edited by edits[i](task)."""
    data = json.load(open(os.path.join(ROOT, "data", "bench_train.json")))
    data["tasks"] = data["tasks"][:3]
    for task, edit in zip(data["tasks"], edits):
        edit(task)
    return write(tmp_path, "tasks.json", data)


def stb_file(tmp_path, *edits):
    """Our StableToolBench-format query fixture, query i edited by edits[i](query)."""
    queries = json.load(open(STB_QUERIES))
    for q, edit in zip(queries, edits):
        edit(q)
    return write(tmp_path, "G1_instruction.json", queries)


# ---- the reader: what a file is, how big, how deep -------------------------------------------
@pytest.mark.parametrize("kind", LOADERS)
def test_a_fifo_is_refused_at_once_instead_of_blocking_forever(tmp_path, kind):
    load, error = LOADERS[kind]
    fifo = tmp_path / "input.json"
    os.mkfifo(fifo)
    out = {}

    def read():
        try:
            out["value"] = load(str(fifo))
        except Exception as e:
            out["error"] = e
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # open() waits for a writer: be one for a moment, so the thread ends, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail(f"{kind}: blocked in open() on a FIFO")
    assert isinstance(out.get("error"), error), out
    msg = str(out["error"])
    assert msg.startswith(str(fifo)) and "FIFO" in msg and "not a regular file" in msg, msg


@pytest.mark.parametrize("kind", LOADERS)
def test_a_folder_or_a_device_is_refused_as_not_a_regular_file(tmp_path, kind):
    load, error = LOADERS[kind]
    assert "a folder" in refused(load, tmp_path, error)
    assert "a character device" in refused(load, "/dev/null", error)   # /dev/zero would be read forever


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    p = write(tmp_path, "big.json", [STB_QUERIES] * 10)
    monkeypatch.setattr(formats, "MAX_INPUT_BYTES", 100)
    assert "over the limit of 100 bytes" in refused(formats.load_tasks, p, formats.TaskFileError)


@pytest.mark.parametrize("kind", JSON_LOADERS)
@pytest.mark.parametrize("how", ["far past the parser's stack", "one level past the limit"])
def test_json_nested_too_deep_is_one_line_not_a_recursion_error(tmp_path, kind, how):
    load, error = LOADERS[kind]
    depth = 100_000 if how.startswith("far") else formats.MAX_JSON_DEPTH + 1
    p = write(tmp_path, "deep.json", "[" * depth + "]" * depth)
    assert f"nested more than {formats.MAX_JSON_DEPTH} levels" in refused(load, p, error)


def test_json_nested_to_the_limit_is_read(tmp_path):
    d = formats.MAX_JSON_DEPTH
    assert formats.read_json(str(write(tmp_path, "ok.json", "[" * d + "]" * d)), "file", ValueError)


@pytest.mark.parametrize("kind, text, key", [
    ("label file", '{"7": %s, "7": %s}' % (json.dumps(label()), json.dumps(label(is_solved={"0": "AnswerStatus.Unsolved"}))),
     "'7'"),
    ("label file", '{"7": {"query": "q", "answer_steps": "", "final_step": "", "is_solved": {"0": "%s", "0": "%s"}}}'
     % (S, S), "'0'"),
    ("task file", json.dumps(json.load(open(STB_QUERIES))[:1])[:-2] + ', "query": "another"}]', "'query'"),
    ("trajectory JSONL", '{"query_id": 1, "query_id": 2, "query": "q", "group": "G1", "steps": []}\n', "'query_id'"),
])
def test_a_key_given_twice_in_one_object_is_refused(tmp_path, kind, text, key):
    load, error = LOADERS[kind]
    msg = refused(load, write(tmp_path, "twice.json", text), error)
    assert f"the key {key} comes twice" in msg, msg


def test_a_lone_surrogate_that_no_utf8_file_can_hold_is_refused(tmp_path):
    p = write(tmp_path, "G1.json", json.dumps(json.load(open(STB_QUERIES))[:1]).replace('"query": "', '"query": "\\ud800'))
    assert "lone UTF-16 surrogate" in refused(formats.load_tasks, p, formats.TaskFileError)


# ---- names from data never become paths ------------------------------------------------------
HOSTILE_GROUPS = {"parent": "../../x", "absolute": "/tmp/steptool-test/precious", "dotdot": "..", "a list": ["G1"],
                  "NUL": "G1\u0000x", "newline": "G1\nG2", "empty": "", "long": "G" * 201}


@pytest.mark.parametrize("case", HOSTILE_GROUPS)
def test_a_task_group_that_is_not_a_plain_name_is_refused_at_read(tmp_path, case):
    group = HOSTILE_GROUPS[case]
    for p in (bench_file(tmp_path, lambda t: None, lambda t: t.update(group=group)),
              stb_file(tmp_path, lambda q: None, lambda q: q.update(group=group))):
        msg = refused(formats.load_tasks, p, formats.TaskFileError)
        assert ": item 1 (query_id " in msg and "is not a plain name" in msg, msg


def test_a_group_given_for_answers_must_be_a_plain_name(tmp_path):
    p = write(tmp_path, "G1_tool.json", {"42": label()})
    with pytest.raises(formats.LabelFileError, match=r"--answers .*G1_tool.json: group '\.\./x' is not a plain name"):
        formats.read_answers([str(p)], ["../x"])


def test_a_trajectory_group_that_is_not_a_plain_name_is_refused(tmp_path):
    traj = {"query_id": 1, "query": "q", "group": "../G1", "steps": []}
    msg = refused(formats.read_trajectories, write(tmp_path, "t.jsonl", json.dumps(traj) + "\n"), formats.DataFileError)
    assert msg.startswith(f"{tmp_path}/t.jsonl:1: group '../G1'"), msg


@pytest.mark.parametrize("qid", ["../7", "a\nb", "", "x" * 201])
def test_a_label_query_id_that_is_not_a_plain_name_is_refused(tmp_path, qid):
    msg = refused(formats.load_labels, write(tmp_path, "G1.json", {qid: label()}), formats.LabelFileError)
    assert "query" in msg and "is not a plain name" in msg, msg


# ---- no silent wrong numbers: one id, one entry ----------------------------------------------
def test_two_tasks_with_one_query_id_in_one_group_are_refused_naming_both(tmp_path):
    p = bench_file(tmp_path, lambda t: None, lambda t: None, lambda t: t.update(query_id=1, group="G1"))
    msg = refused(formats.load_tasks, p, formats.TaskFileError)
    assert "item 2 (query_id 1): query_id 1 is already item 0 of group G1" in msg, msg
    p = stb_file(tmp_path, lambda q: None, lambda q: q.update(query_id=str(json.load(open(STB_QUERIES))[0]["query_id"])))
    assert "is already item 0" in refused(formats.load_tasks, p, formats.TaskFileError)   # 9101 and "9101": one id


def test_one_query_id_in_two_groups_is_two_tasks(tmp_path):
    p = bench_file(tmp_path, lambda t: t.update(group="G1"), lambda t: t.update(query_id=1, group="G2"))
    assert [(t.group, t.query_id) for t in formats.load_tasks(str(p))[:2]] == [("G1", 1), ("G2", 1)]


@pytest.mark.parametrize("qid", [7.9, True, "7.0", "seven", None, [7], "9" * 30])
def test_a_task_query_id_must_be_an_integer_never_rounded(tmp_path, qid):
    msg = refused(formats.load_tasks, bench_file(tmp_path, lambda t: t.update(query_id=qid)), formats.TaskFileError)
    assert "is not an integer" in msg, msg


def test_two_eval_task_files_with_one_query_of_one_group_are_refused_before_the_run(tmp_path, capsys, monkeypatch):
    import steptool
    from harness import models

    def load_policy(*args, **kwargs):
        raise AssertionError("the checks passed: a model would load now")
    monkeypatch.setattr(models, "load_policy", load_policy)
    a = write(tmp_path, "a.json", json.load(open(os.path.join(ROOT, "data", "bench_test.json"))))
    b = write(tmp_path, "b.json", json.load(open(os.path.join(ROOT, "data", "bench_test.json"))))
    with pytest.raises(SystemExit) as e:
        steptool.main(["--eval-tasks", str(a), str(b), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "is in both" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("is_solved, says", [
    ({"0": S, "00": S}, "gives repeat 0 twice, as '0' and '00'"),
    ({"1": S, "-0": S, "0": S}, "repeat index '-0'"),
    ({"0": ["AnswerStatus.Solved"]}, "unknown status ['AnswerStatus.Solved']"),
    ({"0": 1}, "unknown status 1"),
    ([S], "'is_solved' must be an object"),
])
def test_judge_repeats_are_integers_given_once_with_a_known_status(tmp_path, is_solved, says):
    msg = refused(formats.load_labels, write(tmp_path, "G1.json", {"42": label(is_solved=is_solved)}), formats.LabelFileError)
    assert msg.startswith(f"{tmp_path}/G1.json: query 42: ") and says in msg, msg


def test_two_spellings_of_one_query_id_in_a_label_file_are_refused(tmp_path):
    msg = refused(formats.load_labels, write(tmp_path, "G1.json", {"7": label(), "07": label()}), formats.LabelFileError)
    assert "query 07: the same query id as query 7" in msg, msg


# ---- every field the scorers read is of its type ---------------------------------------------
@pytest.mark.parametrize("fields, says", [
    ({"passed": "2", "failed": 1}, "'passed' and 'failed' must both be counts"),
    ({"passed": 2, "failed": [1]}, "'passed' and 'failed' must both be counts"),
    ({"passed": 2}, "'passed' and 'failed' must both be counts"),
    ({"passed": True, "failed": False}, "'passed' and 'failed' must both be counts"),
    ({"answer_steps": "Step 1: {'name': ['a_for_t'], 'arguments': '{}', 'response': ''}"}, "step 1 names ['a_for_t']"),
    ({"final_step": "Final step: {'name': {'x': 1}, 'arguments': ''}"}, "final step names {'x': 1}"),
    ({"tool_names": "a_for_t"}, "'tool_names' must be a list"),
    ({"query": {"text": "q"}}, "'query' must be text"),
    ({"answer_steps": ["Step 1: {}"]}, "missing 'answer_steps' (text)"),
])
def test_a_label_field_of_the_wrong_type_is_one_line_naming_file_and_query(tmp_path, fields, says):
    msg = refused(formats.load_labels, write(tmp_path, "G1.json", {"42": label(**fields)}), formats.LabelFileError)
    assert msg.startswith(f"{tmp_path}/G1.json: query 42: ") and says in msg, msg


def test_a_label_file_with_a_field_of_the_wrong_type_is_reported_and_the_good_one_still_scored(tmp_path):
    for fields in ({"passed": 2, "failed": "1"}, {"answer_steps": "Step 1: {'name': ['a'], 'arguments': ''}"}):
        bad = str(write(tmp_path, "G1_tool.json", {"42": label(**fields)}))
        scored, _, errors = cli.score_paths([LABELS, bad])
        assert [g for _, g, _ in scored] == ["G1_instruction"] and len(errors) == 1, errors
        assert errors[0].startswith(bad + ": query 42: ")


@pytest.mark.parametrize("node, says", [
    ("a node", "answer_details node 0"),
    ({"role": "tool", "message": "m", "next": "not a list"}, "answer_details node 0"),
    ({"role": "system", "message": "", "next": [{"role": "tool", "next": {"a": 1}}]}, "answer_details node 1"),
])
def test_a_converted_answer_whose_chain_of_nodes_is_broken_is_refused(tmp_path, node, says):
    answer = {"query": "q", "available_tools": [], "answer": {"final_answer": "", "answer_details": [node]}}
    msg = refused(formats.load_answers, write(tmp_path, "G1.json", {"42": answer}), formats.LabelFileError)
    assert says in msg, msg


@pytest.mark.parametrize("edit, says", [
    (lambda q: q.update(query={"text": "q"}), "'query' must be text"),
    (lambda q: q.update(api_list="all of them"), "'api_list' must be a list"),
    (lambda q: q["api_list"].insert(0, "an api"), "api_list[0] must be an object"),
    (lambda q: q["api_list"][0].update(tool_name=["t"]), "'tool_name' must be text"),
    (lambda q: q["api_list"][0].update(required_parameters=[{"name": 3}]), "'required_parameters' needs a text 'name'"),
    (lambda q: q["api_list"][0].update(api_description={"a": 1}), "'api_description' must be text"),
    (lambda q: q.update({"relevant APIs": [["t", ["a"]]]}), "'relevant APIs' must be a list of [tool name, API name]"),
])
def test_a_query_field_of_the_wrong_type_is_one_line_naming_file_and_item(tmp_path, edit, says):
    msg = refused(formats.load_tasks, stb_file(tmp_path, edit), formats.TaskFileError)
    assert ": item 0 (query_id 9101): " in msg and says in msg, msg


@pytest.mark.parametrize("edit, says", [
    (lambda t: t.update(relevant="league_table_for_scoreline"), "'relevant' must be a list"),
    (lambda t: t.update(answer="Beltir Rovers"), "'answer' must be a list"),
    (lambda t: t.update(answer=[["Beltir Rovers"]]), "'answer' must be a list of facts"),
    (lambda t: t.update(expert={"thought": "x"}), "'expert' must be a list"),
    (lambda t: t.update(functions=["no_such_function"]), "function 'no_such_function' is not one of the file's"),
    (lambda t: t.update(query=None), "'query' must be text"),
])
def test_a_benchmark_task_field_of_the_wrong_type_is_one_line_naming_file_and_item(tmp_path, edit, says):
    msg = refused(formats.load_tasks, bench_file(tmp_path, edit), formats.TaskFileError)
    assert ": item 0 (query_id 1): " in msg and says in msg, msg


# ---- the command lines: one line, exit status 2, nothing written -----------------------------
def run_cli(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_eval_given_a_fifo_as_task_file_exits_2_with_one_line_and_writes_nothing(tmp_path):
    fifo, out = tmp_path / "tasks.json", tmp_path / "out"
    os.mkfifo(fifo)
    r = run_cli("eval.py", "--model", "tiny", "--tasks", str(fifo), "--out", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert str(fifo) in r.stderr and "FIFO" in r.stderr
    assert os.listdir(tmp_path) == ["tasks.json"]


def test_steptool_given_a_deeply_nested_task_file_exits_2_with_one_line_and_no_run_folder(tmp_path):
    deep, out = write(tmp_path, "tasks.json", "[" * 100_000 + "]" * 100_000), tmp_path / "run"
    r = run_cli("steptool.py", "--model", "tiny", "--tasks", str(deep), "--output", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert str(deep) in r.stderr and "nested more than" in r.stderr
    assert os.listdir(tmp_path) == ["tasks.json"]
