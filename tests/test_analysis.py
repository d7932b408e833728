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
