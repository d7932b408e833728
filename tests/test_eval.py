"""eval.py as a specification: Pass Rate exactly as StableToolBench, Recall, groups, file formats.

The fixture tests/fixtures/eval_G1_instruction.json is a StableToolBench pass-rate label file of
five queries, 3 judge repeats, scored by hand (1 = Solved, .5 = Unsure, 0 = Unsolved):

    query  ends with                 labels (r0, r1, r2)      counts as         relevant / called     recall
    101    Finish give_answer        S  S  U                  1   1   .5        {A,B} / A,A,B          1
    102    Finish give_answer        N  U  S                  0   .5  1         {A,C} / A              1/2
    103    a tool call (no Finish)   S  S  S                  0   0   0         {D}   / E,E            0
    104    Finish give_up_and_restart U U  U                  0   0   0         {A,B,C,D} / B,C        1/2
    105    Finish give_answer        S  S  (missing)          1   1   0         {A,A} / A (truncated)  1
    score_r = sum / 5                                         .4  .5  .3
    Pass Rate = mean 40.0 %, population std sqrt((0 + .01 + .01) / 3) = 8.165 %;  Recall = 3 / 5 = 60.0 %
"""
import json
import math
import os
import subprocess
import sys

import pytest

import env
import eval as ev  # conftest.py puts the repo root on sys.path
from harness import compare
from harness import evaluate as cli  # eval.py's command line
from harness import judge as J
from harness import toolclient
from harness import formats

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

LABELS = os.path.join(HERE, "fixtures", "eval_G1_instruction.json")
QUERIES = os.path.join(HERE, "fixtures", "eval_queries.json")
SAMPLE = os.path.join(ROOT, "..", "shared", "data", "stabletoolbench", "sample_pass_rate_labels.json")
S, U, N = "AnswerStatus.Solved", "AnswerStatus.Unsure", "AnswerStatus.Unsolved"


def score_fixture(**kw):
    scored, groups, errors = cli.score_paths([LABELS], **kw)
    assert errors == []
    return scored[0][2]


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def entry(final_step="Final step: {'name': 'Finish', 'arguments': '{\"return_type\": \"give_answer\"}', 'response': ''}",
          is_solved=None, answer_steps=""):
    return {"query": "q", "tool_names": [], "answer_steps": answer_steps, "final_step": final_step,
            "is_solved": {"0": S} if is_solved is None else is_solved, "length": 1}


# ---- Pass Rate ------------------------------------------------------------------------------
def test_pass_rate_of_fixture_matches_hand_computed_per_repeat_scores():
    m = score_fixture()
    assert m["n"] == 5 and m["repeats"] == 3
    assert m["pass_rate"] == pytest.approx(40.0)
    assert m["pass_rate_std"] == pytest.approx(100 * math.sqrt(0.02 / 3))  # 8.165: population, not sample, std


def test_missing_repeat_counts_as_unsolved_like_stabletoolbench(tmp_path):
    # a: repeats 0,1,2 all Solved; b: only repeat 0 Solved -> r0 = 2/2, r1 = 1/2, r2 = 1/2
    p = write(tmp_path, "G2_category.json", {"a": entry(is_solved={"0": S, "1": S, "2": S}),
                                             "b": entry(is_solved={"0": S})})
    (_, _, m), = cli.score_paths([p])[0]
    assert m["repeats"] == 3 and m["missing_repeats"] == 1
    assert m["pass_rate"] == pytest.approx(100 * (1 + 0.5 + 0.5) / 3)


def test_unsure_counts_half():
    assert ev.pass_rate([(1 + 0.5) / 2]) == (75.0, 0.0)


def test_answer_not_ending_in_finish_give_answer_counts_unsolved_whatever_its_label():
    assert formats.ends_with_answer("Final step: {'name': 'Finish', 'arguments': '{\"return_type\": \"give_answer\", "
                               "\"final_answer\": \"42\"}', 'response': ''}")
    assert not formats.ends_with_answer("Final step: {'name': 'Finish', 'arguments': '{\"return_type\": "
                                   "\"give_up_and_restart\"}', 'response': ''}")
    assert not formats.ends_with_answer("Final step: {'name': 'search_for_x', 'arguments': '{}', 'response': 'Finish'}")
    assert not formats.ends_with_answer("")  # no step at all
    assert formats.ends_with_answer("Final step: {'name': 'Finish', 'arguments': '{\"return_type\": \"give_answer\", \"fin")
    assert score_fixture()["overridden"] == 2  # 103 (tool call) and 104 (give up) were labelled Solved / Unsure


def test_sample_label_file_from_shared_scores_zero():
    if not os.path.exists(SAMPLE):
        pytest.skip("../shared is absent in a user's clone")
    (_, group, m), = cli.score_paths([SAMPLE])[0]
    # six queries, every repeat Unsolved, and none ends with Finish: score_r = 0 / 6 for r = 0, 1, 2
    assert (m["n"], m["repeats"], m["pass_rate"], m["pass_rate_std"]) == (6, 3, 0.0, 0.0)
    assert group == "sample_pass_rate_labels"


# ---- Recall ---------------------------------------------------------------------------------
def test_recall_counts_each_relevant_api_once_and_missing_ones_as_zero():
    assert score_fixture(query_paths=[QUERIES])["recall"] == pytest.approx(60.0)
    assert ev.recall(["a", "a", "a"], ["a", "b"]) == 0.5  # three calls of one API are one API
    assert ev.recall(["a"], ["a", "a"]) == 1.0  # a relevant API listed twice is one API
    assert ev.recall(["a"], []) is None  # nothing to recall: left out of the mean


def test_step_names_parse_literals_and_fall_back_to_regex_on_truncated_steps():
    text = ("Step 1: {'name': 'a_for_t', 'arguments': '{}', 'response': 'ok'}\n"
            "Step 2: {'name': 'b_for_t', 'arguments': '{\"q\": \"x\"}', 'response': '{\"error\": \"\", \"resp")
    assert formats.step_names(text) == ["a_for_t", "b_for_t"]
    assert formats.step_names("") == []


def test_step_text_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = f"Step 1: {{'name': __import__('os').system('touch {marker}')}}"
    assert formats.step_names(text) == [] and not marker.exists()


def test_recall_prefers_the_label_files_group_when_query_ids_repeat_across_groups():
    tasks = [env.Task(7, "q", [], ["a_for_t"], "G1_instruction", {}), env.Task(7, "q", [], ["b_for_t"], "G2_category", {})]
    lookup = ev.relevant_index(tasks)
    assert lookup("G2_category", "7") == ["b_for_t"]
    assert lookup("G3_instruction", "7") is None  # ambiguous: no Recall rather than a wrong one
    assert ev.relevant_index(tasks[:1])("anything", 7) == ["a_for_t"]


# ---- groups ---------------------------------------------------------------------------------
def m(pass_rate, recall=None):
    return {"pass_rate": pass_rate, "recall": recall}


def test_group_means_follow_the_paper():
    scored = [("f", g, m(p, r)) for g, p, r in [("G1_instruction", 30, 60), ("G1_category", 40, 70), ("G1_tool", 50, 80),
                                                  ("G2_instruction", 20, 50), ("G2_category", 10, None),
                                                  ("G3_instruction", 5, 40)]]
    g = ev.group_means(scored)
    assert g["I1"] == {"pass_rate": 40, "recall": 70}  # mean of the three G1 groups
    assert g["I2"] == {"pass_rate": 15, "recall": None}  # mean of the two G2 groups; a missing Recall spreads
    assert g["I3"] == {"pass_rate": 5, "recall": 40}  # G3_instruction alone
    assert g["Avg"]["pass_rate"] == pytest.approx(155 / 6)  # unweighted over the six groups


def test_incomplete_paper_group_is_not_reported_and_embedded_groups_stand_alone():
    g = ev.group_means([("f", "G1_instruction", m(30)), ("f", "G1_tool", m(50))])
    assert "I1" not in g and g["Avg"]["pass_rate"] == 40
    g = ev.group_means([("a", "G1", m(90, 80)), ("b", "G2", m(60, 70)), ("c", "G3", m(30, 60))])
    assert set(g) == {"G1", "G2", "G3", "Avg"} and g["Avg"] == {"pass_rate": 60, "recall": 70}


def test_two_files_of_one_group_give_no_group_means():
    assert ev.group_means([("ours.json", "G1_tool", m(30)), ("theirs.json", "G1_tool", m(50))]) == {}


def test_group_name_is_the_file_stem_or_the_stabletoolbench_group_it_contains():
    assert formats.label_group("out/G2_category.json") == "G2_category"
    assert formats.label_group("labels/G1_tool_toolllama_dfs.json") == "G1_tool"  # their <group>_<model>.json
    assert formats.label_group("runs/G1.json") == "G1"
    assert formats.label_group("x/G2_category.json", override="mine") == "mine"


# ---- malformed files ------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ('{"1": {"query": "q", ', "cannot read label file"),
    ({"42": {"query": "q", "answer_steps": "", "final_step": ""}}, "query 42: missing 'is_solved'"),
    ({"42": entry(is_solved={"0": "AnswerStatus.Maybe"})}, "query 42: unknown status 'AnswerStatus.Maybe'"),
    ({"42": entry(is_solved={"first": S})}, "query 42: repeat index 'first'"),
    ({"42": entry(is_solved={"99999999": S})}, "query 42: repeat index '99999999'"),   # not 10^8 repeats in memory
    ({"42": entry(is_solved={"\u0663": S})}, "query 42: repeat index"),                 # an Arabic-Indic 3
    ({"42": {**entry(), "final_step": None}}, "query 42: missing 'final_step'"),
    ({}, "non-empty JSON object"),
], ids=["bad_json", "missing_is_solved", "unknown_status", "bad_repeat_index", "huge_repeat_index",
        "non_ascii_repeat_index", "missing_final_step", "empty"])
def test_malformed_label_file_error_names_file_and_entry(tmp_path, content, message):
    p = write(tmp_path, "G1_tool.json", content)
    with pytest.raises(formats.LabelFileError, match=message) as e:
        formats.load_labels(p)
    assert str(e.value).startswith(p)


def test_one_bad_file_is_reported_and_the_others_still_scored(tmp_path):
    bad = write(tmp_path, "G1_tool.json", {"42": entry(is_solved={"0": "Solved"})})
    bad_queries = write(tmp_path, "q.json", [{"query_id": 1}])
    # values of the wrong type, whether the reader refuses them or the scoring trips on them:
    # ToolBench's counts as text, and a step whose name is a list (101 has relevant APIs: Recall reads it)
    counts = write(tmp_path, "G1_category.json", {"101": {**entry(), "passed": 1, "failed": "2"}})
    listed = write(tmp_path, "G2_category.json", {"101": entry(
        answer_steps="Step 1: {'name': ['current_weather_for_weather_hub'], 'arguments': '{}', 'response': ''}")})
    scored, _, errors = cli.score_paths([LABELS, bad, counts, listed], [QUERIES, bad_queries])
    assert [g for _, g, _ in scored] == ["G1_instruction"] and scored[0][2]["recall"] == pytest.approx(60.0)
    assert len(errors) == 4 and errors[0].startswith(bad_queries) and errors[1].startswith(bad + ": query 42")
    assert errors[2].startswith(counts) and errors[3].startswith(listed)
    assert all("\n" not in e for e in errors)  # one line each


# ---- our trajectories -> StableToolBench label files ----------------------------------------
def fake_tasks():
    fs = [{"name": n, "description": "", "parameters": {}} for n in ("a_for_t", "c_for_t")]
    return [env.Task(1, "q1", fs, ["a_for_t", "c_for_t"], "G1", {}), env.Task(2, "q2", fs, ["a_for_t"], "G1", {}),
            env.Task(3, "q3", fs, ["c_for_t"], "G2", {})]


def fake_trajectories():
    call = env.Step("...", "a_for_t", {"x": 1}, '{"error": "", "response": "ok"}', {"error": "", "response": "ok"})
    answer = env.Step("...", "Finish", {"return_type": "give_answer", "final_answer": "42"})
    give_up = env.Step("...", "Finish", {"return_type": "give_up_and_restart"})
    garbled = env.Step("Action:", error="Parse error: 'Action:' names no function.", observation="{...}")
    unknown = env.Step("...", "c_for_x", error="No such function name: c_for_x", observation="{...}")
    return [env.Trajectory(1, "q1", "G1", [garbled, call, answer], "give_answer", "42", "finish"),
            env.Trajectory(2, "q2", "G1", [unknown, garbled], "", "", "max_steps"),
            env.Trajectory(3, "q3", "G2", [give_up], "give_up", "", "finish")]


def test_evaluate_judges_only_answers_and_scores_them_as_stabletoolbench():
    calls = []
    def judge_fn(task, traj):
        calls.append(task.query_id)
        return [1, 0.5, 0][len(calls) - 1]
    labels, scored, groups = J.evaluate(fake_trajectories(), fake_tasks(), judge_fn, repeats=3, workers=1)
    assert calls == [1, 1, 1]  # the never-finished and the given-up answers are Unsolved without a judge
    assert labels["G1"]["1"]["is_solved"] == {"0": S, "1": U, "2": N}
    assert labels["G1"]["2"]["is_solved"] == {"0": N, "1": N, "2": N}
    g1 = dict((g, m) for _, g, m in scored)["G1"]
    assert g1["pass_rate"] == pytest.approx(100 * (0.5 + 0.25 + 0) / 3)  # score_r = .5, .25, 0
    assert g1["recall"] == pytest.approx(100 * (0.5 + 0) / 2)
    assert set(groups) == {"G1", "G2", "Avg"}


def test_label_entry_is_written_in_stabletoolbench_style():
    task, traj = fake_tasks()[0], fake_trajectories()[0]
    e = formats.to_label(task, traj, [S])
    assert e["answer_steps"] == (
        "Step 1: {'name': 'a_for_t', 'arguments': '{\"x\": 1}', 'response': '{\"error\": \"\", \"response\": \"ok\"}'}\n"
        "Step 2: {'name': 'Finish', 'arguments': '{\"return_type\": \"give_answer\", \"final_answer\": \"42\"}', "
        "'response': ''}")
    assert e["final_step"] == "Final step: " + e["answer_steps"].split("\n")[1].partition(": ")[2]
    assert "'name': 'Finish'" in e["final_step"]  # StableToolBench's own test before it calls the judge
    assert e["length"] == 2 and e["tool_names"] == ["a_for_t", "c_for_t", "Finish"]


def test_trajectory_recall_ignores_turns_that_made_no_call_and_agrees_with_its_label():
    tasks, trajs = fake_tasks(), fake_trajectories()
    assert [ev.trajectory_recall(t, k) for t, k in zip(trajs, tasks)] == [0.5, 0.0, 0.0]
    for t, k in zip(trajs, tasks):
        assert ev.recall(formats.step_names(formats.to_label(k, t, [N])["answer_steps"]), k.relevant) == ev.trajectory_recall(t, k)
    assert formats.to_label(tasks[1], trajs[1], [N])["final_step"] == ""  # no call at all: like StableToolBench, ""


def test_written_outputs_read_back_through_labels(tmp_path):
    labels, scored, groups = J.evaluate(fake_trajectories(), fake_tasks(), lambda t, j: 1, repeats=2, workers=1)
    cli.write_outputs(str(tmp_path), labels, scored, groups)
    formats.write_trajectories(str(tmp_path / "trajectories.jsonl"), fake_trajectories())
    paths = [str(tmp_path / f"{g}.json") for g in ("G1", "G2")]
    again, again_groups, errors = cli.score_paths(paths)
    assert errors == [] and [m for _, _, m in again] == [{**m, "recall_n": None, "recall": None} for _, _, m in scored]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["files"]["G1.json"]["pass_rate"] == pytest.approx(50.0) and results["groups"] == groups
    assert (tmp_path / "results.csv").read_text().splitlines()[0] == "group,n,repeats,pass_rate,pass_rate_std,recall"
    back = [formats.trajectory(json.loads(l)) for l in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert back == fake_trajectories()


# ---- command line ---------------------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=180)


def test_cli_labels_prints_the_table_and_a_json_last_line():
    r = run_cli("--labels", LABELS, "--queries", QUERIES, "--json")
    assert r.returncode == 0, r.stderr
    assert "40.0 ± 8.2" in r.stdout and "60.0" in r.stdout
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["files"][LABELS] == {"pass_rate": pytest.approx(40.0), "pass_rate_std": pytest.approx(8.16497, abs=1e-4),
                                    "n": 5, "repeats": 3, "recall": pytest.approx(60.0)}
    assert out["groups"] == {"G1_instruction": {"pass_rate": pytest.approx(40.0), "recall": pytest.approx(60.0)}}


def test_cli_reports_the_failing_file_and_exits_nonzero(tmp_path):
    bad = write(tmp_path, "G1_tool.json", "not json")
    r = run_cli("--labels", LABELS, bad, "--json")
    assert r.returncode == 1 and bad in r.stderr
    assert list(json.loads(r.stdout.strip().splitlines()[-1])["files"]) == [LABELS]


def test_cli_model_path_runs_a_saved_model_and_writes_every_output(tmp_path):
    bench = json.load(open(os.path.join(ROOT, "data", "bench_test.json")))
    bench["tasks"] = [next(t for t in bench["tasks"] if t["group"] == g) for g in ("G1", "G2", "G3")]
    tasks = write(tmp_path, "tasks.json", json.dumps(bench))
    model = str(tmp_path / "model")
    subprocess.run([sys.executable, "-m", "harness.models", "--save-tiny", model], cwd=ROOT, check=True, capture_output=True)
    out = str(tmp_path / "out")
    r = run_cli("--model", model, "--tasks", tasks, "--max-steps", "2", "--max-new-tokens", "12",
                "--repeats", "2", "--out", out)
    assert r.returncode == 0, r.stderr
    for name in ("results.json", "results.csv", "trajectories.jsonl", "G1.json", "G2.json", "G3.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(res["groups"]) >= {"G1", "G2", "G3"}
    assert res["benchmark"] == "embedded v2"   # the task file's version, in every results file
    assert all(m["n"] == 1 and m["repeats"] == 2 for m in res["files"].values())
    trajs = [json.loads(l) for l in open(os.path.join(out, "trajectories.jsonl"))]
    assert [t["query_id"] for t in trajs] == [t["query_id"] for t in bench["tasks"]]
    assert all(1 <= len(t["steps"]) <= 2 for t in trajs)
    # a model shipped as an adapter file on the same base: the same rollouts as the policy it came from
    from harness import models
    models.save_adapter(models.load_policy(model), str(tmp_path / "a.safetensors"))
    r = run_cli("--model", model, "--adapters", str(tmp_path / "a.safetensors"), "--tasks", tasks, "--max-steps", "2",
                "--max-new-tokens", "12", "--repeats", "2", "--out", str(tmp_path / "out2"))
    assert r.returncode == 0, r.stderr
    again = [json.loads(l) for l in open(os.path.join(tmp_path, "out2", "trajectories.jsonl"))]
    assert [t["steps"] for t in again] == [t["steps"] for t in trajs]
    r = run_cli("--model", model, "--adapters", tasks, "--tasks", tasks, "--out", str(tmp_path / "out3"))
    assert r.returncode != 0 and "adapter file" in r.stderr and "Traceback" not in r.stderr


def test_per_query_scores_average_to_the_group_pass_rates_and_recalls():
    labels, scored, _ = J.evaluate(fake_trajectories(), fake_tasks(), lambda task, traj: 0.5, repeats=2, workers=1)
    each = ev.per_query(labels, fake_tasks())
    assert {(q["group"], q["query_id"]) for q in each} == {("G1", "1"), ("G1", "2"), ("G2", "3")}
    for _, g, m in scored:
        mine = [q for q in each if q["group"] == g]
        assert 100 * sum(q["pass"] for q in mine) / len(mine) == pytest.approx(m["pass_rate"])
        assert 100 * sum(q["recall"] for q in mine) / len(mine) == pytest.approx(m["recall"])


def test_paired_bootstrap_ci_covers_the_difference_and_needs_the_same_tasks():
    import numpy as np
    rng = np.random.default_rng(1)
    keys = [(g, str(i)) for g in ("G1", "G2", "G3") for i in range(120)]
    b = {k: float(rng.random() < 0.3) for k in keys}
    same = compare.paired_bootstrap(b, b)
    assert set(same) == {"G1", "G2", "G3", "overall"} and all(ci == [0.0, 0.0] for ci in same.values())
    a = dict(b)
    for k in keys[::4]:      # 90 tasks of 360 gain a pass where b failed, and 12 lose one
        a[k] = 1.0
    for k in keys[1::30]:
        a[k] = 0.0
    diff = 100 * (sum(a.values()) - sum(b.values())) / len(keys)
    ci = compare.paired_bootstrap(a, b, seed=3)
    assert ci["overall"][0] < diff < ci["overall"][1] and ci["overall"][0] > 0
    assert ci["overall"][1] - ci["overall"][0] < ci["G1"][1] - ci["G1"][0]  # three groups: a narrower interval
    assert compare.paired_bootstrap(a, b, seed=3) == ci                        # seeded
    with pytest.raises(ValueError, match="different tasks"):
        compare.paired_bootstrap(a, {k: v for k, v in b.items() if k != keys[0]})


# the bootstrap as it was first written: all n x len(values) indices drawn at once (2,000 x 100,000
# queries took 3.2 GB); the blocked draw must give the same numbers, bit for bit
def one_draw_bootstrap_ci(values, n=2000, seed=0, level=0.95):
    import numpy as np
    v = np.asarray(values, dtype=float)
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(n, len(v)))].mean(axis=1) * 100
    return [float(x) for x in np.percentile(means, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])]


def one_draw_paired_bootstrap(a, b, n=10000, seed=0, level=0.95):
    import numpy as np
    rng, groups, means = np.random.default_rng(seed), sorted({g for g, _ in a}), {}
    for g in groups:
        d = np.array([a[k] - b[k] for k in sorted(a) if k[0] == g]) * 100
        means[g] = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    means["overall"] = np.mean([means[g] for g in groups], axis=0)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {g: [float(x) for x in np.percentile(m, q)] for g, m in means.items()}


def test_bootstrap_cis_are_the_numbers_of_the_single_draw_for_the_same_seed():
    import numpy as np
    rng = np.random.default_rng(7)
    for size, seed in [(1, 0), (5, 0), (163, 3), (1000, 1), (3001, 2)]:
        values = (rng.integers(0, 3, size) / 2).tolist()          # per-query scores 0, .5, 1
        assert ev.bootstrap_ci(values, seed=seed) == one_draw_bootstrap_ci(values, seed=seed)
    v = rng.random(13)
    for block in (1, 13 * 4, 1 << 20):        # 1 row a block, 4 rows (150 = 37 x 4 + 2), all in one block
        blocked = ev.resampled_means(v, 150, np.random.default_rng(5), block=block)
        assert np.array_equal(blocked, v[np.random.default_rng(5).integers(0, 13, size=(150, 13))].mean(axis=1))
    keys = [(g, str(i)) for g, n in (("G1", 40), ("G2", 25)) for i in range(n)]
    a, b = ({k: float(rng.random() < p) for k in keys} for p in (0.5, 0.3))
    assert compare.paired_bootstrap(a, b, n=3000, seed=4) == one_draw_paired_bootstrap(a, b, n=3000, seed=4)


def test_bootstrap_ci_of_100000_queries_stays_under_200_mb():
    import tracemalloc
    import numpy as np
    values = np.random.default_rng(0).random(100_000)
    tracemalloc.start()                      # numpy reports its array buffers to tracemalloc
    try:
        ci = ev.bootstrap_ci(values)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200e6, f"peak {peak / 1e6:.0f} MB"   # all 2,000 resamples at once: 3,200 MB
    assert ci[0] < 50 < ci[1]


def test_run_policy_cuts_tool_responses_at_the_obs_chars_it_is_given(make_policy, tool_server, test_tasks, monkeypatch):
    import rollout
    seen = []
    real = rollout.rollout
    monkeypatch.setattr(rollout, "rollout", lambda *a, **k: seen.append(k["obs_chars"]) or real(*a, **k))
    trajs = ev.run_policy(make_policy(), test_tasks[:2], toolclient.ToolClient(tool_server.url), max_steps=2, max_new_tokens=8,
                         progress=False, obs_chars=40)
    assert seen == [40] and len(trajs) == 2
    assert all(len(s.observation) <= 40 for t in trajs for s in t.steps if s.record)   # a call's response, cut
