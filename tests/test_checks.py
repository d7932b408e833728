"""Bad flags and input files are refused before anything runs: one line naming the flag or the file,
exit status 2, no traceback, no run folder (checks.py, steptool.py)."""
import json
import os

import pytest

from conftest import ROOT


def run(capsys, *args):
    """steptool.main in-process -> (exit status, stderr)."""
    import steptool
    with pytest.raises(SystemExit) as e:
        steptool.main(list(args))
    return e.value.code, capsys.readouterr().err


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def bench_with(tmp_path, edit):
    data = json.load(open(os.path.join(ROOT, "data", "bench_train.json")))
    data["tasks"] = data["tasks"][:3]
    edit(data)
    return write(tmp_path, "tasks.json", json.dumps(data))


def no_expert_thought(data):
    del data["tasks"][1]["expert"][0]["thought"]


STB_QUERY = [{"query": "q", "query_id": 1, "api_list": [{"category_name": "C", "tool_name": "t", "api_name": "a",
                                                          "api_description": "", "required_parameters": [],
                                                          "optional_parameters": []}], "relevant APIs": [["t", "a"]]}]


@pytest.mark.parametrize("args, says", [
    (["--iterations", "-1"], "--iterations -1"),
    (["--episodes-per-iteration", "0"], "--episodes-per-iteration 0"),
    (["--ppo-epochs", "0"], "--ppo-epochs 0"),
    (["--eval-limit", "-1"], "--eval-limit -1"),
    (["--advantage", "foo"], "--advantage foo"),
    (["--algo", "dpo"], "--algo dpo"),
    (["--dtype", "half"], "--dtype half"),
    (["--save-every", "0"], "--save-every 0"),
    (["--mini-batch-size", "0"], "--mini-batch-size 0"),
    (["--grad-accum", "0"], "--grad-accum 0"),
    (["--temperature", "-1"], "--temperature -1"),
    (["--lr", "nan"], "--lr nan"),
    (["--max-context", "10"], "--max-context 10"),
    (["--reward", "nosuch.fn"], "nosuch"),
    (["--data", "/nonexistent/file.tsv"], "/nonexistent/file.tsv"),
    (["--model", "./no/such/model"], "--model ./no/such/model"),
    (["--adapters", "/nonexistent.safetensors"], "/nonexistent.safetensors"),
])
def test_a_bad_flag_is_one_line_exit_2_and_no_run_folder(tmp_path, capsys, args, says):
    out = str(tmp_path / "run")
    code, err = run(capsys, *args, "--output", out)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out)


@pytest.mark.parametrize("make, says", [
    (lambda p: ["--eval-tasks", write(p, "empty.json", "[]")], "no tasks"),
    (lambda p: ["--tasks", write(p, "empty.json", '{"tasks": [], "functions": {}}')], "no tasks"),
    (lambda p: ["--tasks", write(p, "stb.json", json.dumps(STB_QUERY))], "no answer facts to judge IsSolved by"),
    (lambda p: ["--eval-tasks", write(p, "stb.json", json.dumps(STB_QUERY))], "--eval-tasks"),
    (lambda p: ["--tasks", write(p, "stb.json", json.dumps(STB_QUERY)), "--judge-url", "http://127.0.0.1:9/v1",
                "--sft-epochs", "2"], "no task of"),
    (lambda p: ["--tasks", bench_with(p, no_expert_thought)], "item 1"),
    (lambda p: ["--data", write(p, "h.tsv", "prompt\tresponse\treward\n")], "h.tsv"),
    (lambda p: ["--data", write(p, "inf.tsv", "prompt\tresponse\treward\n['a']\t['b']\t[1e999]\n")], "inf.tsv"),
])
def test_a_bad_input_file_is_one_line_naming_it(tmp_path, capsys, make, says):
    out = str(tmp_path / "run")
    code, err = run(capsys, *make(tmp_path), "--output", out)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out)


def test_hub_ids_and_aliases_are_not_paths_but_path_like_names_are(tmp_path, monkeypatch):
    from harness import models
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("Qwen/Qwen2-7B", "tiny", "smollm2", "gpt2"):
        assert not models.looks_like_path(name), name
    for name in ("./model", "/abs/model", "~/model", "a/b/c", "runs/x", "model.gguf"):
        assert models.looks_like_path(name), name
