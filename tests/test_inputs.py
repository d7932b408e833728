"""Specification of sft.py's command line on bad input: a bad flag or --data file is one line on stderr
naming it (and the file's line or item), exit status 2, before the output folder is claimed or a model
loads. No model is built here: load_policy is replaced by one that fails the test if it is called."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from harness import models  # noqa: E402
import sft  # noqa: E402

TSV = os.path.join(ROOT, "tests", "fixtures", "reward_steptool.tsv")
HEADER, ROW = "prompt\tresponse\treward\n", "['p']\t['r']\t[1.0]\n"


class Loaded(Exception):
    """Raised by the stand-in load_policy: the checks passed and the model would load now."""


def load_policy(*args, **kwargs):
    raise Loaded


@pytest.fixture
def sft_main(tmp_path, monkeypatch, capsys):
    """sft_main(*args) -> sft.main's one stderr line; it must exit with status 2 and leave no --output."""
    monkeypatch.setattr(models, "load_policy", load_policy)

    def run(*args):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as e:
            sft.main(["--model", "tiny", "--output", str(out), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1, err
        assert not out.exists()                                   # refused before the folder is claimed
        return err[0]
    return run


def bench_file(tmp_path, edit):
    """A one-task copy of the embedded benchmark's train split, edited by edit(task)."""
    data = json.load(open(os.path.join(ROOT, "data", "bench_train.json")))
    task = data["tasks"][0]
    edit(task)
    (tmp_path / "tasks.json").write_text(json.dumps({**data, "tasks": [task]}))
    return str(tmp_path / "tasks.json")


@pytest.mark.parametrize("flags", [["--epochs", "0"], ["--epochs", "-1"], ["--lr", "0"], ["--lr", "-0.0001"],
                                   ["--lr", "nan"], ["--lr", "inf"], ["--batch-size", "0"],
                                   ["--micro-batch-size", "0"], ["--max-tokens", "-1"]])
def test_a_flag_out_of_range_is_one_line_naming_it(sft_main, flags):
    msg = sft_main("--data", TSV, *flags)
    assert msg.startswith(f"sft: {flags[0]} ") and "must be" in msg, msg


BAD_DATA = {  # case: (file name, its text or None for no file, what the error says)
    "missing TSV": ("missing.tsv", None, "missing.tsv: cannot read"),
    "header-only TSV": ("header.tsv", HEADER, "header.tsv: no trajectories"),
    "empty TSV": ("empty.tsv", "", "empty.tsv: empty"),
    "empty lists": ("rows.tsv", HEADER + ROW + "[]\t[]\t[]\n", "rows.tsv:3: "),
    "infinite reward": ("rows.tsv", HEADER + ROW + "['p']\t['r']\t[1e999]\n", "rows.tsv:3: rewards must be finite"),
    "bad header": ("rows.tsv", "prompt\tresponses\treward\n" + ROW, "rows.tsv:1: the header"),
    "task file not JSON": ("tasks.json", "{not json", "tasks.json: cannot read task file"),
    "missing task file": ("missing.json", None, "missing.json"),
    "no expert": ("tasks.json", '{"functions": {}, "tasks": []}', "tasks.json: no task has an expert trajectory"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_a_bad_data_file_is_one_line_naming_it(sft_main, tmp_path, case):
    name, body, expected = BAD_DATA[case]
    if body is not None:
        (tmp_path / name).write_text(body)
    msg = sft_main("--data", str(tmp_path / name))
    assert msg.startswith("sft: --data ") and expected in msg, msg


def test_an_expert_step_without_a_thought_is_one_line_naming_the_task_and_step(sft_main, tmp_path):
    path = bench_file(tmp_path, lambda t: t["expert"][1].pop("thought"))
    msg = sft_main("--data", path)
    assert "tasks.json: item 0 (query_id" in msg and "expert step 1" in msg and "thought" in msg, msg


def test_good_flags_and_data_pass_the_checks_and_reach_the_model_load(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_policy", load_policy)
    for data in (TSV, bench_file(tmp_path, lambda t: None)):
        with pytest.raises(Loaded):
            sft.main(["--model", "tiny", "--output", str(tmp_path / "out"), "--data", data, "--epochs", "1",
                      "--max-tokens", "0"])


def test_sft_refuses_to_train_on_nothing():
    with pytest.raises(ValueError, match="nothing to train"):
        sft.sft(None, [], epochs=1)
    with pytest.raises(ValueError, match="nothing to train"):
        sft.sft(None, ["an episode"], epochs=0)
