"""The failure taxonomy (harness/analysis.py): each kind on a hand-made episode of a two-call chain, and the report
read from a compare folder's eval_trajectories.jsonl.gz files."""
import gzip
import json
import os

import env
from harness import analysis as A

TASK = env.Task(5, "Who wrote The Silent River, and where was the author born?", [], [], "G2", {},
                answer=["Kalo Mir", "Velmora"],
                expert=[{"name": "search_books_for_shelffinder", "arguments": {"title": "The Silent River"}},
                        {"name": "author_profile_for_shelffinder", "arguments": {"author": "Kalo Mir"}},
                        {"name": "Finish", "arguments": {"final_answer": "Kalo Mir, Velmora"}}])
BOOK = {"name": "search_books_for_shelffinder", "arguments": {"title": "the silent river"}, "succ": 1}
AUTHOR = {"name": "author_profile_for_shelffinder", "arguments": {"author": "Kalo Mir"}, "succ": 1}


def ep(*steps, answer="Kalo Mir, Velmora", finish="give_answer", passed=0.0):
    steps = [{"error": "", "observation": "", **s} for s in steps]
    return {"group": "G2", "query_id": 5, "pass": passed, "finish": finish, "final_answer": answer,
            "steps": steps + ([{"name": "Finish", "arguments": {}, "succ": 0, "error": "", "observation": ""}] if finish else []),
            "end": "finish" if finish else "max_steps"}


def test_each_failure_gets_the_first_kind_that_fits():
    assert A.failure(TASK, ep(BOOK, AUTHOR, passed=1.0)) == "solved"
    assert A.failure(TASK, ep(BOOK, finish="", answer="")) == "finish never"
    assert A.failure(TASK, ep(BOOK, finish="give_up")) == "finish never"
    assert A.failure(TASK, ep({**BOOK, "succ": 0})) == "finish too early"      # no call succeeded
    assert A.failure(TASK, ep(AUTHOR)) == "relevant API skipped"               # the query's title never searched
    assert A.failure(TASK, ep(BOOK)) == "dependent call skipped"               # the author, from the response, never asked
    assert A.failure(TASK, ep(BOOK, {**AUTHOR, "arguments": {"author": "Someone Else"}})) == "wrong arguments / error"
    assert A.failure(TASK, ep(BOOK, {**AUTHOR, "succ": 0})) == "wrong arguments / error"
    assert A.failure(TASK, ep(BOOK, AUTHOR, answer="Kalo Mir", passed=0.5)) == "right calls, wrong answer"


def test_report_counts_each_methods_episodes_over_its_seeds(tmp_path):
    for seed, eps in (("seed0", [ep(BOOK, AUTHOR, passed=1.0)]), ("seed1", [ep(BOOK)])):
        run = tmp_path / seed / "steptool"
        run.mkdir(parents=True)
        with gzip.open(run / "eval_trajectories.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(e) + "\n" for e in eps)
    tax = A.taxonomy(str(tmp_path), [TASK])
    m = tax["steptool"]
    assert m["episodes"] == 2 and m["kinds"] == {"solved": 1, "dependent call skipped": 1} and len(m["seeds"]) == 2
    assert m["calls"] == 1.5 and m["steps"] == 2.5 and m["failed_calls"] == 0
    text = A.report(tax, {"steptool": "StepTool"})
    assert "| StepTool | 2 | 2 | 50.0 |" in text


# ---- pass@k: discovery against re-weighting (harness/passk.py) ------------------------------
def test_pass_at_k_is_the_unbiased_estimate():
    from harness import passk
    assert passk.pass_at_k(16, 0, 8) == 0.0 and passk.pass_at_k(16, 16, 1) == 1.0
    assert passk.pass_at_k(16, 4, 1) == 4 / 16
    assert abs(passk.pass_at_k(4, 1, 2) - (1 - 3 / 6)) < 1e-12        # 1 - C(3,2)/C(4,2)
    assert passk.pass_at_k(16, 10, 8) == 1.0                           # fewer failures than k: always a pass


def test_discovered_tasks_are_those_the_baseline_never_solves():
    from harness import passk
    base = {"a": 0, "b": 3, "c": 5, "d": 2, "e": 0}
    rl = {"a": 2, "b": 9, "c": 5, "d": 0, "e": 0}
    assert passk.compare_counts(base, rl) == (["a"], ["b"], ["d"])


def test_passk_samples_each_policy_once_and_resumes_at_the_next(tmp_path, small_model, monkeypatch):
    from harness import passk
    calls = []
    real = passk.sample
    monkeypatch.setattr(passk, "sample", lambda *a: calls.append(1) or real(*a))
    argv = ["--model", small_model, "--policy", "sft=", "--policy", "rl=", "--per-group", "1", "--n", "2",
            "--max-steps", "2", "--max-new-tokens", "8", "--output", str(tmp_path / "pk")]
    passk.main(argv)
    got = json.load(open(tmp_path / "pk" / "rl.json"))
    assert got["n"] == 2 and len(got["counts"]) == 3 and all(0 <= c <= 2 for c in got["counts"].values())
    assert got["benchmark"] == "embedded v2" and len(calls) == 2
    text = open(tmp_path / "pk" / "passk.md").read()
    assert "pass@1" in text and "pass@2" in text and "rl against sft" in text
    passk.main(argv)                     # both files there: nothing sampled again
    assert len(calls) == 2
