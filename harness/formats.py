"""The file formats StepTool's users already have: read, checked and written in one place.

1. The original StepTool training TSV (header prompt, response, reward; each cell a Python-literal list,
   one entry per step): read_tsv, write_tsv.
2. Our trajectory JSONL: one trajectory_dict(env.Trajectory) per line, plus `rewards` once shaped (read_jsonl,
   read_trajectories). A row that came from a TSV keeps its `prompt` / `response` text, so TSV -> JSONL
   -> TSV is exact (convert); other rows go to TSV rendered in Qwen2's chat format from their task.
3. StableToolBench pass-rate label files, what its eval_pass_rate.py writes: {query id: {query,
   tool_names, answer_steps ("Step k: {...}" lines), final_step, is_solved: {repeat: "AnswerStatus.X"}}}
   (load_labels, to_label). Ours add `length` and, when judge.py judged them, per repeat `reasons`,
   `task_status` and `pass_label` ("passed" / "failed"; `coin` where a coin flip settled it), and the
   `passed` / `failed` counts of ToolBench's label files: extra keys that both scorers ignore.
4. StableToolBench converted answers, what its convert_to_answer_format.py writes for the pass-rate
   evaluator: {query id: {query, available_tools, answer: {method, total_steps, final_answer,
   answer_details: [{role, message, next: [node]}]}}}, a tool node's message {name, arguments,
   response} (traj_to_example, answer_steps). load_answers reads these and label files alike.
5. Task files: StableToolBench query files (a JSON list of queries with api_list and relevant APIs) and
   the embedded benchmark's ({functions, tasks}, with answer facts and expert steps) -> [env.Task]
   (load_tasks; a bad one is a TaskFileError, "PATH: item I (query_id Q): what is wrong").
       python -m harness.formats --tasks data/bench_test.json --show 1    # render one task's prompt
Every input file (task, label, answer, trajectory, TSV) is read whole by one reader,
read_input / read_json, before any of it is used: a regular file only (a FIFO, a device or a folder is
refused before open(), which could block or never end), at most MAX_INPUT_BYTES, UTF-8; JSON nested at
most MAX_JSON_DEPTH levels, no key twice in one object, no lone surrogate. Names taken from data that
can become file names (a group) must be plain names (plain_name); query ids and repeat indices are
integers (integer_id), two spellings of one ("7", "07") refused. Errors: a trajectory file we cannot use
is a DataFileError, "PATH:LINE: what is wrong"; a label or answer file, a LabelFileError, "PATH: query
Q: what is wrong"; the reader raises the caller's own error class. Command lines print each as one line.

Departures:
1. Step texts are Python literals: parsed with ast.literal_eval, never eval; a truncated step falls
   back to a regex on its 'name' (and stays text in an answer rebuilt from a label file).
2. Our label files list the steps that reached a tool (or Finish); turns that could not be parsed or
   named an unknown function made no call and are left out, as StableToolBench's converter leaves out
   assistant turns without a function call. In a converted answer of ours they are assistant nodes.
3. An answer rebuilt from a label file (judged again by eval.py --answers) offers only the tool names
   (a label file has no schemas), so the judge's solvability question sees names, not descriptions.
"""
import argparse
import ast
import csv
import io
import json
import os
import re
import stat
import sys
from dataclasses import asdict, fields

import env
from eval import STATUS, STB_GROUPS, called_steps, ends_with_answer, parse_step, split_steps, step_names  # label entries
from reward import literal  # JSON or Python-literal text -> its value, never run

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
TASK_FILES = [os.path.join(HERE, "data", f"bench_{s}.json") for s in ("train", "test")]


# ---- 0. one reader for every input file ----------------------------------------------------
MAX_INPUT_BYTES = 1 << 30  # 1 GiB: an input is held in memory whole; far above any task, label or trajectory file
MAX_JSON_DEPTH = 200       # levels of nested objects and lists. Our files nest < 10, a StableToolBench converted
                           # answer 2 per node of its chain (~60); Python's parser fails near 1000, copies near 500
_NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def read_input(path, what, error):
    """The whole text of the input file `path`, read once (UTF-8, a leading BOM dropped). Only a regular
    file is opened: a FIFO, device or folder is refused from os.stat, before open() could block on a FIFO
    without a writer or read a device forever; so is a file over MAX_INPUT_BYTES. A refusal is
    error("PATH: cannot read WHAT: why"); a byte that is not UTF-8, error("PATH:LINE: not UTF-8 ...")."""
    def refuse(why):
        return error(f"{path}: cannot read {what}: {why}")

    def check(st):
        if not stat.S_ISREG(st.st_mode):
            kind = next((w for test, w in _NOT_REGULAR if test(st.st_mode)), "something else")
            raise refuse(f"it is {kind}, not a regular file")
        if st.st_size > MAX_INPUT_BYTES:
            raise refuse(f"{st.st_size:,} bytes, over the limit of {MAX_INPUT_BYTES:,} bytes for an input file")
    try:
        check(os.stat(path))
        # O_NONBLOCK: a path swapped for a FIFO after the stat still opens at once, and fstat refuses it
        with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            check(os.fstat(f.fileno()))
            data = f.read(MAX_INPUT_BYTES + 1)   # + 1: a file that grew since is still caught
    except OSError as e:  # missing, unreadable
        raise refuse(e.strerror or e) from None
    if len(data) > MAX_INPUT_BYTES:
        raise refuse(f"it grew while read, over the limit of {MAX_INPUT_BYTES:,} bytes for an input file")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save it as UTF-8") from None


class _TwiceKey(Exception):
    """Raised by _object: the key that one JSON object gives twice."""


def _object(pairs):
    """json's object_pairs_hook: the object as a dict, or _TwiceKey when a key comes twice (json.loads
    would keep the last one silently: two labels of one query, one of them never scored)."""
    d = dict(pairs)
    if len(d) < len(pairs):
        seen = set()
        raise _TwiceKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def _too_deep(obj):
    """Does obj nest objects and lists more than MAX_JSON_DEPTH levels? Level by level: no recursion."""
    level, todo = 0, [obj] if isinstance(obj, (dict, list)) else []
    while todo:
        level += 1
        if level > MAX_JSON_DEPTH:
            return True
        todo = [v for x in todo for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, (dict, list))]
    return False


def _lone_surrogate(obj):
    """The first text (key or value) in obj that holds half a UTF-16 pair ("\\ud800"), which JSON allows
    but no UTF-8 file can hold: written back (a label file, a trajectory) it would fail. None if none."""
    todo = [obj]
    while todo:
        x = todo.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return x
        elif isinstance(x, dict):
            todo += [*x, *x.values()]
        elif isinstance(x, list):
            todo += x
    return None


def parse_json(text, where, error):
    """JSON text -> its value; not JSON, nested deeper than MAX_JSON_DEPTH, a key twice in one object or
    a lone surrogate is error("WHERE: why")."""
    deep = f"{where}: nested more than {MAX_JSON_DEPTH} levels deep"
    try:
        obj = json.loads(text, object_pairs_hook=_object)
    except _TwiceKey as e:
        raise error(f"{where}: the key {e.args[0]!r:.60} comes twice in one object (JSON would keep the last "
                    "silently)") from None
    except RecursionError:  # far deeper than MAX_JSON_DEPTH: the parser ran out of stack first
        raise error(deep) from None
    except ValueError as e:
        raise error(f"{where}: not JSON ({e})") from None
    if _too_deep(obj):
        raise error(deep)
    if ("\\ud" in text or "\\uD" in text) and (bad := _lone_surrogate(obj)) is not None:  # only an escape makes one
        raise error(f"{where}: the text {bad!r:.60} holds a lone UTF-16 surrogate, which UTF-8 cannot store")
    return obj


def read_json(path, what, error):
    """read_input + parse_json: the JSON value of the input file `path`; every refusal is one line,
    error("PATH: cannot read WHAT: why"). error: the caller's class (TaskFileError, LabelFileError,
    server.py's ConfigError ...), so each command line reports it as it reports its other input errors."""
    return parse_json(read_input(path, what, error), f"{path}: cannot read {what}", error)


def plain_name(name, what, error):
    """name, if a name from data (a group) can be a file name inside a folder: a non-empty string with no
    '/' (nor the OS's separator), not '.' or '..', not absolute, at most 200 bytes, and printable (no NUL,
    and it stays one line in an error or a table). Else error(...). runs.plain_name is this rule."""
    if not (isinstance(name, str) and name.isprintable() and name not in ("", ".", "..") and "/" not in name
            and os.sep not in name and not os.path.isabs(name) and len(name.encode()) <= 200):
        raise error(f"{what} {name!r:.80} is not a plain name (a file name: no '/', no NUL, not '.' or '..', "
                    "printable, at most 200 bytes)")
    return name


_INTEGER = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only ("\u0663" is a digit to str.isdecimal); 18 fit in 64 bits


def integer_id(v):
    """A query id or repeat index as a file gives it -> int, or None if it is not one: an int (not a bool)
    within 64 bits, or the decimal text of one. "7" and "07" give the same int: callers refuse such twins."""
    if type(v) is int:
        return v if -2 ** 63 <= v < 2 ** 63 else None
    return int(v) if isinstance(v, str) and _INTEGER.fullmatch(v) else None


# ---- 1. the original StepTool training TSV ---------------------------------------------------
IM_END, ASSISTANT = "<|im_end|>\n", "<|im_start|>assistant\n"
_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n", re.S)


class DataFileError(ValueError):
    """A trajectory file (TSV, JSONL) we cannot use, as one line: "PATH:LINE: what is wrong". The command
    lines print it and exit with status 2, before any work starts."""


def finite(x):
    """A reward: an int or float (not a bool) that a float holds, not inf or nan."""
    return type(x) in (int, float) and abs(x) <= sys.float_info.max


def check_row(prompt, response, reward):
    """Why a training row {prompt, response, reward} is unusable (one line), or "" when it can train:
    three lists of the same length (one entry per step, at least one), of str, str (none empty) and finite numbers."""
    for name, x in (("prompt", prompt), ("response", response), ("rewards", reward)):
        if not isinstance(x, list):
            return f"{name} must be a list, got {type(x).__name__} {x!r:.40}"
    if not len(prompt) == len(response) == len(reward):
        return (f"prompt, response, rewards must be lists of equal length (one per step), "
                f"got {len(prompt)}, {len(response)}, {len(reward)}")
    if not reward:
        return "prompt, response and rewards are empty lists: a trajectory has at least one step"
    if not all(isinstance(x, str) for x in prompt + response):
        return "prompt and response must be lists of str"
    if "" in response:   # an action of no tokens: its step would have no token to carry its reward
        return f"response {response.index('')} is empty: every step's action needs at least one token"
    bad = [x for x in reward if not finite(x)]
    return f"rewards must be finite numbers, got {bad[0]!r}" if bad else ""


def read_tsv(path):
    """The original's training TSV -> [{prompt, response, reward}], at least one row. Anything else (a
    malformed row, check_row, no rows, not UTF-8) is a DataFileError naming the file and line."""
    csv.field_size_limit(sys.maxsize)
    text = read_input(path, "training TSV", DataFileError)
    rows, reader = [], csv.reader(io.StringIO(text, newline=""), delimiter="\t")
    try:
        header = next(reader, None)
        if header is None:
            raise DataFileError(f"{path}: empty: no header, no trajectories")
        if header != ["prompt", "response", "reward"]:
            raise DataFileError(f"{path}:1: the header must be prompt<TAB>response<TAB>reward")
        line = 2
        for cells in reader:
            where, line = f"{path}:{line}", reader.line_num + 1  # a row's first line; cells may span lines
            if not cells:
                continue
            if len(cells) != 3:
                raise DataFileError(f"{where}: expected 3 tab-separated cells, got {len(cells)}")
            try:
                p, r, w = (ast.literal_eval(c) for c in cells)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
                raise DataFileError(f"{where}: a cell is not a Python-literal list ({type(e).__name__})") from None
            why = check_row(p, r, w)
            if why:
                raise DataFileError(f"{where}: {why}")
            rows.append({"prompt": p, "response": r, "reward": w})
    except csv.Error as e:
        raise DataFileError(f"{path}:{reader.line_num}: {e}") from None
    if not rows:
        raise DataFileError(f"{path}: no trajectories (only the header)")
    return rows


def write_tsv(path, rows):
    """[{prompt, response, reward}] -> the original's TSV, written as its own files are."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["prompt", "response", "reward"])
        for row in rows:
            reward = [x if type(x) in (int, float) else float(x) for x in row["reward"]]  # no numpy reprs
            w.writerow([repr(list(row["prompt"])), repr(list(row["response"])), repr(reward)])


# ---- 2. our trajectory JSONL, and TSV <-> JSONL ----------------------------------------------
def trajectory(d):
    """An env.Trajectory from its JSON object (dataclasses.asdict of one)."""
    return env.Trajectory(**{**d, "steps": [env.Step(**s) for s in d.get("steps", [])]})


def read_jsonl(path):
    """-> [(line number, object)] of a JSONL file: one JSON object a line (blank lines skipped), at least
    one. Anything else is a DataFileError naming the file and line."""
    out = []
    for i, line in enumerate(io.StringIO(read_input(path, "trajectory file", DataFileError)), 1):
        if not line.strip():
            continue
        d = parse_json(line, f"{path}:{i}", DataFileError)
        if not isinstance(d, dict):
            kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(d), "a number")
            raise DataFileError(f"{path}:{i}: {kind}, not a JSON object (one trajectory a line)")
        out.append((i, d))
    if not out:
        raise DataFileError(f"{path}: no trajectories (an empty file)")
    return out


def read_trajectories(path):
    """read_jsonl of our trajectory JSONL -> [(line number, dict, env.Trajectory)]; a line whose fields
    are missing or of the wrong type (Trajectory, Step) is a DataFileError naming it."""
    keys, out = [f.name for f in fields(env.Trajectory)], []
    for i, d in read_jsonl(path):
        try:
            t = trajectory({k: d[k] for k in keys if k in d})
        except (TypeError, ValueError, AttributeError) as e:
            raise DataFileError(f"{path}:{i}: not a trajectory ({e})") from None
        bad = next(filter(None, map(_wrong_type, (t, *t.steps))), None)
        if bad or type(t.query_id) is not int:
            raise DataFileError(f"{path}:{i}: not a trajectory: {bad or f'query_id {t.query_id!r}'} is of the wrong type")
        plain_name(t.group, f"{path}:{i}: group", DataFileError)
        out.append((i, d, t))
    return out


def _wrong_type(obj):
    """The first field of dataclass obj whose value is not of its declared type (None only where that is
    the default), as "name value", or None."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(f.type, type) and not isinstance(v, f.type) and not (v is None and f.default is None):
            return f"{f.name} {v!r:.40}"
    return None


def write_trajectories(path, trajectories):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(asdict(t), ensure_ascii=False) + "\n" for t in trajectories)


def tsv_row_to_traj(row, n):
    """A TSV row -> our trajectory dict: steps parsed from the text, and the text itself (prompt,
    response) with the rewards. A TSV row has no query id: row n gets -n (negative: unknown)."""
    user = dict(_TURN.findall(row["prompt"][0])).get("user", "")
    t = {"query_id": -n, "query": user.strip().removesuffix("Begin!").strip(), "group": "tsv", "steps": [],
         "finish": "", "final_answer": "", "end": ""}
    for k, text in enumerate(row["response"]):
        text, nxt = text.removesuffix(IM_END), row["prompt"][k + 1] if k + 1 < len(row["prompt"]) else ""
        m, act = _TURN.match(nxt), env.parse_action(text)
        obs = m.group(2) if m else nxt
        step = {"text": text, "name": act.name, "arguments": act.arguments, "observation": obs, "record": None,
                "error": act.error}
        kind = act.arguments.get("return_type")
        if not act.error and act.name == "Finish" and kind in ("give_answer", "give_up_and_restart"):
            t.update(finish="give_answer" if kind == "give_answer" else "give_up", end="finish",
                     final_answer=str(act.arguments.get("final_answer", "")) if kind == "give_answer" else "")
        elif not act.error and act.name != "Finish":  # the original cut long observations ("..."): keep the text
            rec, prefix = literal(obs) if obs.startswith("{") else None, '{"error": "", "response": '
            step["record"] = (rec if isinstance(rec, dict) and "response" in rec else
                              {"error": "", "response": obs[len(prefix):]} if obs.startswith(prefix) else
                              {"error": obs, "response": ""})
        t["steps"].append(step)
    return {**t, "rewards": row["reward"], "prompt": row["prompt"], "response": row["response"]}


def traj_to_tsv_row(d, tasks):
    """Our trajectory dict (with `rewards`) -> a TSV row. A row that came from a TSV gives back its text;
    others are rendered in Qwen2's chat format: env.initial_messages(task) (task by query_id, from the
    task files), then each step, tool observations in the `function` role as in the original. The row
    is checked as read_tsv checks one (check_row): ValueError."""
    if "rewards" not in d:
        raise ValueError("no `rewards`: shape them first with `python -m harness.annotate annotate`")
    if "prompt" in d and "response" in d:
        row = {"prompt": d["prompt"], "response": d["response"], "reward": d["rewards"]}
    else:
        task, steps = tasks.get(d["query_id"]), d["steps"]
        if task is None or task.query != d["query"]:
            raise ValueError(f"query_id {d['query_id']} with this query is in none of the task files (--tasks)")
        head = "".join(f"<|im_start|>{m['role']}\n{m['content']}{IM_END}" for m in env.initial_messages(task))
        prompt = [head + ASSISTANT] + [f"<|im_start|>function\n{s['observation']}{IM_END}{ASSISTANT}" for s in steps[:-1]]
        row = {"prompt": prompt, "response": [s["text"] + IM_END for s in steps], "reward": d["rewards"]}
    why = check_row(row["prompt"], row["response"], row["reward"])
    if why:
        raise ValueError(why)
    return row


def load_task_index(paths):
    return {t.query_id: t for p in paths if os.path.exists(p) for t in load_tasks(p)}


def convert(src, dst, task_files=TASK_FILES):
    """TSV -> JSONL or JSONL -> TSV, by the files' extensions. Returns the number of rows. The input is
    read and checked whole before anything is written: a bad row is a DataFileError naming its line."""
    kinds = (os.path.splitext(src)[1].lower(), os.path.splitext(dst)[1].lower())
    if kinds == (".tsv", ".jsonl"):
        rows = [tsv_row_to_traj(r, n) for n, r in enumerate(read_tsv(src), 1)]
        with open(dst, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    elif kinds == (".jsonl", ".tsv"):
        tasks, rows = load_task_index(task_files), []
        for i, d in read_jsonl(src):
            try:
                rows.append(traj_to_tsv_row(d, tasks))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                what = e if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                raise DataFileError(f"{src}:{i}: {what}") from None
        write_tsv(dst, rows)
    else:
        raise ValueError(f"convert reads .tsv and writes .jsonl, or the reverse; got {kinds[0]} -> {kinds[1]}")
    return len(rows)


# ---- 3. StableToolBench pass-rate label files ------------------------------------------------
MAX_REPEATS = 1000   # judge repeats per answer (StableToolBench's evaluate_times: 3 to 7)
STATUS_OF = {1: "AnswerStatus.Solved", 0.5: "AnswerStatus.Unsure", 0: "AnswerStatus.Unsolved"}


class LabelFileError(ValueError):
    """A label or converted-answer file we cannot use: "PATH: query Q: what is wrong"."""


def _json_object(path, what):
    """A label or answer file -> {query id: entry}: read_json, a non-empty object whose keys are query ids,
    plain names (StableToolBench's are integers), no integer twice however written ("7", "07": one query
    scored twice, and matched to its --queries entry once)."""
    obj, ids = read_json(path, what, LabelFileError), {}
    if not isinstance(obj, dict) or not obj:
        raise LabelFileError(f"{path}: expected a non-empty JSON object keyed by query id")
    for qid in obj:
        n = integer_id(plain_name(qid, f"{path}: query", LabelFileError))
        if n is not None and ids.setdefault(n, qid) != qid:
            raise LabelFileError(f"{path}: query {qid}: the same query id as query {ids[n]}")
    return obj


def _check_repeats(where, is_solved):
    """is_solved {repeat index: "AnswerStatus.X"}: indices integers 0 .. MAX_REPEATS - 1, none twice however
    written ("0", "00": two votes of one repeat, one of them silently dropped), statuses known."""
    if not isinstance(is_solved, dict):
        raise LabelFileError(f"{where}: 'is_solved' must be an object (judge repeat -> AnswerStatus)")
    seen = {}
    for r, s in is_solved.items():
        n = integer_id(r) if r.isdigit() else None   # no sign: "-0" is no repeat
        if n is None or not 0 <= n < MAX_REPEATS:
            raise LabelFileError(f"{where}: repeat index {r!r:.40} is not an integer 0 .. {MAX_REPEATS - 1}")
        if seen.setdefault(n, r) != r:
            raise LabelFileError(f"{where}: 'is_solved' gives repeat {n} twice, as {seen[n]!r} and {r!r}")
        if not (isinstance(s, str) and s in STATUS):
            raise LabelFileError(f"{where}: unknown status {s!r:.60} (expected one of {', '.join(STATUS)})")


def _check_label(where, e, judged=True):
    """A label entry, each field the scorers read of its type (judged: is_solved and the pass counts too;
    an answer file's labels are judged again, so those are ignored there)."""
    if not isinstance(e, dict):
        raise LabelFileError(f"{where}: not a JSON object (a label entry{'' if judged else ' or a converted answer'})")
    if judged and "is_solved" not in e:
        raise LabelFileError(f"{where}: missing 'is_solved' (an object: judge repeat -> AnswerStatus)")
    for key in ("final_step", "answer_steps"):
        if not isinstance(e.get(key), str):
            raise LabelFileError(f"{where}: missing '{key}' (text)")
    if not isinstance(e.get("query", ""), str):
        raise LabelFileError(f"{where}: 'query' must be text")
    if not (isinstance(e.get("tool_names", []), list) and all(isinstance(n, str) for n in e.get("tool_names", []))):
        raise LabelFileError(f"{where}: 'tool_names' must be a list of function names (text)")
    steps = [(f"step {k}", text) for k, text in enumerate(split_steps(e["answer_steps"]), 1)]
    for which, text in [*steps, ("final step", e["final_step"])]:
        d = parse_step(text) if text else None
        if d and not isinstance(d["name"], str):   # Recall counts names in a set: a list would crash it
            raise LabelFileError(f"{where}: {which} names {d['name']!r:.40}, not a function name (text)")
    if judged:
        _check_repeats(where, e["is_solved"])
        counts = [e.get(k) for k in ("passed", "failed")]   # ToolBench's counts: the majority pass rate
        if counts != [None, None] and not all(type(c) is int and c >= 0 for c in counts):
            raise LabelFileError(f"{where}: 'passed' and 'failed' must both be counts (integers >= 0), got "
                                 f"{counts[0]!r:.20} and {counts[1]!r:.20}")


def load_labels(path):
    """A pass-rate label file -> {query id: entry}, each entry checked; errors name file and query."""
    labels = _json_object(path, "label file")
    for qid, e in labels.items():
        _check_label(f"{path}: query {qid}", e)
    if not any(e["is_solved"] for e in labels.values()):
        raise LabelFileError(f"{path}: no judge repeats in any query")
    return labels


def label_group(path, override=None):
    """G2_category.json -> G2_category; G1_tool_toolllama.json -> G1_tool; else the file stem."""
    if override:
        return override
    stem = os.path.splitext(os.path.basename(path))[0]
    m = re.search("|".join(STB_GROUPS), stem)
    return m.group(0) if m else stem


def to_label(task, traj, statuses, judged=None):
    """Our trajectory + per-repeat statuses -> one entry of a StableToolBench pass-rate label file."""
    return label_entry(traj_to_example(task, traj), statuses, judged)


def label_entry(example, statuses, judged=None):
    """A converted answer + per-repeat statuses ["AnswerStatus.X"] (+ judge.py's per-repeat records:
    reasons, task_status, pass_label, coin) -> a label entry; answer_steps as StableToolBench writes them."""
    steps, final = answer_steps(example)
    e = {"query": example["query"], "tool_names": [tool_name(t) for t in example["available_tools"]],
         "answer_steps": steps, "final_step": final,
         "is_solved": {str(r): s for r, s in enumerate(statuses)}, "length": len(split_steps(steps))}
    if judged:
        for key in ("reason", "task_status", "pass_label", "coin"):
            e[key + "s" if key == "reason" else key] = {str(r): j[key] for r, j in enumerate(judged) if j.get(key)}
        e["passed"] = sum(j["pass_label"] == "passed" for j in judged)  # ToolBench's counts
        e["failed"] = len(judged) - e["passed"]
    return e


# ---- 4. StableToolBench converted answers ----------------------------------------------------
def tool_name(t):
    return (t.get("function") or t)["name"]   # an OpenAI `tools` item or a plain function schema


def chain(nodes):
    """[{role, message}] -> answer_details: one path of nodes, each the only `next` of the one before."""
    head = []
    for n in reversed(nodes):
        head = [{"role": n["role"], "message": n["message"], "next": head}]
    return head


def traj_to_example(task, traj, method="steptool"):
    """Our trajectory -> a converted answer as StableToolBench's converter writes one: the offered
    functions and Finish; system and user nodes with empty messages (as theirs); per turn an assistant
    node (its thought; a turn that made no call: its text) and, for a call, a tool node {name,
    arguments (JSON text), response ("" for Finish)}; final_answer the Finish arguments as JSON text."""
    nodes = [{"role": "system", "message": ""}, {"role": "user", "message": ""}]
    for s in traj.steps:
        called = bool(s.name and not s.error)
        thought = env.parse_action(s.text).thought if called else s.text
        if thought.strip():
            nodes.append({"role": "assistant", "message": thought.strip()})
        if called:
            nodes.append({"role": "tool", "message": {"name": s.name, "arguments": json.dumps(s.arguments, ensure_ascii=False),
                                                      "response": "" if s.name == "Finish" else s.observation}})
    last = called_steps(traj)[-1:]
    final = json.dumps(last[0].arguments, ensure_ascii=False) if last and last[0].name == "Finish" else ""
    return {"query": traj.query, "available_tools": list(task.functions) + [env.FINISH],
            "answer": {"method": method, "total_steps": len(nodes), "final_answer": final,
                       "answer_details": chain(nodes)}}


def answer_steps(example):
    """A converted answer -> (answer_steps, final_step) texts, as StableToolBench's get_steps: each tool
    node along the first path, "Step k: {message}", and the last one as "Final step: {message}"."""
    steps, node = [], (example["answer"]["answer_details"] or [None])[0]
    while node:
        if node.get("role") == "tool" and node.get("message"):
            steps.append(str(node["message"]))
        node = (node.get("next") or [None])[0]
    return "\n".join(f"Step {k}: {m}" for k, m in enumerate(steps, 1)), f"Final step: {steps[-1]}" if steps else ""


def label_to_example(e):
    """A label entry (ours or StableToolBench's) -> a converted answer (departure 3), to judge it again."""
    nodes = [{"role": "system", "message": ""}, {"role": "user", "message": ""}]
    for text in split_steps(e["answer_steps"]):
        d = parse_step(text)
        nodes.append({"role": "tool", "message": d if d and "arguments" in d else text.partition(":")[2].strip()})
    last = nodes[-1]["message"] if len(nodes) > 2 else None
    final = (last.get("arguments", "") if isinstance(last, dict) else last) if "'name': 'Finish'" in e["final_step"] else ""
    return {"query": e.get("query", ""), "available_tools": [{"name": n} for n in e.get("tool_names") or []],
            "answer": {"method": "label file", "total_steps": len(nodes), "final_answer": str(final),
                       "answer_details": chain(nodes)}}


def load_answers(path):
    """A converted-answer file, or a label file (its is_solved ignored) -> {query id: converted answer}.
    Errors name the file and the query."""
    raw, out = _json_object(path, "answer file"), {}
    for qid, e in raw.items():
        where = f"{path}: query {qid}"
        if isinstance(e, dict) and isinstance(e.get("answer"), dict):
            a, tools = e["answer"], e.get("available_tools")
            if not isinstance(e.get("query"), str) or not isinstance(tools, list):
                raise LabelFileError(f"{where}: a converted answer needs 'query' (text) and 'available_tools' (a list)")
            if not all(isinstance(t, dict) and isinstance(t.get("function") or t, dict)
                       and isinstance((t.get("function") or t).get("name"), str) for t in tools):
                raise LabelFileError(f"{where}: each of 'available_tools' needs a 'name'")
            if not isinstance(a.get("final_answer"), str) or not isinstance(a.get("answer_details"), list):
                raise LabelFileError(f"{where}: 'answer' needs 'final_answer' (text) and 'answer_details' (a list)")
            node, k = (a["answer_details"] or [None])[0], 0
            while node:   # the path answer_steps walks: each node an object, its `next` a list
                if not (isinstance(node, dict) and isinstance(node.get("next") or [], list)):
                    raise LabelFileError(f"{where}: answer_details node {k} must be an object whose 'next' is a list")
                node, k = (node.get("next") or [None])[0], k + 1
            out[qid] = e
        else:
            _check_label(where, e, judged=False)
            out[qid] = label_to_example(e)
    return out


def read_answers(paths, group_names=()):
    """eval.py --answers files -> ([(group, query id, converted answer)], {group: file}); one file a group."""
    items, names = [], {}
    for i, p in enumerate(paths):
        g = label_group(p, group_names[i] if group_names else None)
        plain_name(g, f"--answers {p}: group", LabelFileError)   # eval.py writes <group>.json
        if g in names:
            raise LabelFileError(f"--answers {names[g]} and {p} are both group {g}; give --groups, or one file a group")
        names[g] = p
        items += [(g, qid, example) for qid, example in load_answers(p).items()]
    return items, names


# ---- 5. task files: StableToolBench query files and the embedded benchmark's ---------------
class TaskFileError(ValueError):
    """A task file we cannot use, as one line: "PATH: item I (query_id Q): what is wrong"."""


def load_tasks(path):
    """StableToolBench query files (a JSON list) or the embedded benchmark's files -> [Task]. The file is
    read whole by read_json (a regular file, its size, nesting, no key twice) and every item is
    checked before any is used: each field of its type, the group a plain name (eval.py writes the file
    <group>.json), the query_id an integer, and no query_id twice in one group (one would go unscored)."""
    if str(path).startswith("bfcl:"):                     # BFCL's multi-turn entries (harness/bfcl.py)
        from harness import bfcl
        try:
            return bfcl.load_tasks(path)
        except ValueError as e:
            raise TaskFileError(str(e)) from None
    data = read_json(path, "task file", TaskFileError)
    group = os.path.splitext(os.path.basename(path))[0]
    if isinstance(data, dict) and "tasks" in data:
        if not (isinstance(data["tasks"], list) and isinstance(data.get("functions", {}), dict)):
            raise TaskFileError(f"{path}: 'tasks' must be a list and 'functions' an object (name -> schema)")
        items, make = data["tasks"], lambda d: _bench_task(d, data.get("functions", {}))
    elif isinstance(data, list):
        items, make = data, lambda d: _stb_task(d, group)
    else:
        raise TaskFileError(f"{path}: expected a JSON list of queries or a benchmark object with 'tasks'")
    tasks, seen = [], {}
    for i, item in enumerate(items):
        qid = item.get("query_id", "?") if isinstance(item, dict) else "?"
        where = f"{path}: item {i} (query_id {qid if type(qid) is int else repr(qid)[:40]})"
        try:
            t = make(item)
            plain_name(t.group, "group", ValueError)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TaskFileError(f"{where}: {e if type(e) is ValueError else f'{type(e).__name__}: {e}'}") from None
        if seen.setdefault((t.group, t.query_id), i) != i:
            raise TaskFileError(f"{where}: query_id {t.query_id} is already item {seen[t.group, t.query_id]} "
                                f"of group {t.group}: one id, one task")
        tasks.append(t)
    return tasks


def benchmark(path):
    """Which benchmark a task file holds, for results files: its `benchmark` field ("embedded v2"), "embedded v1"
    for the embedded benchmark's files before versions were named, else "task file NAME"."""
    if str(path).startswith("bfcl:"):
        from harness import bfcl
        return f"BFCL v4 {path[len('bfcl:'):]} ({bfcl.WHEEL})"
    data = read_json(path, "task file", TaskFileError)
    if isinstance(data, dict) and isinstance(data.get("benchmark"), str):
        return data["benchmark"]
    if isinstance(data, dict) and data.get("format") == "steptool-bench/1":
        return "embedded v1"
    return f"task file {os.path.basename(path)}"


_WORDS = {str: "text", list: "a list", dict: "an object"}


def _get(d, key, kind, default=None):
    """d[key] (or default, when given, if it is missing), which must be a `kind`: else ValueError naming key."""
    if key not in d and default is None:
        raise ValueError(f"missing '{key}'")
    v = d.get(key, default)
    if not isinstance(v, kind):
        raise ValueError(f"'{key}' must be {_WORDS[kind]}, got {type(v).__name__} {str(v)[:40]!r}")
    return v


def _texts(d, key):
    v = _get(d, key, list)
    if not all(isinstance(x, str) for x in v):
        raise ValueError(f"'{key}' must be a list of text")
    return v


def _query_id(d):
    """The query_id: an integer, or the decimal text of one (integer_id); never 7.9 read as 7."""
    qid = integer_id(d["query_id"])
    if qid is None:
        raise ValueError(f"query_id {d['query_id']!r:.40} is not an integer")
    return qid


def _bench_task(d, schemas):
    names = _texts(d, "functions")
    unknown = [n for n in names if n not in schemas]
    if unknown:
        raise ValueError(f"function {unknown[0][:60]!r} is not one of the file's 'functions'")
    fs = [_schema(schemas[n]) for n in names]
    answer = _get(d, "answer", list, [])
    if not all(type(a) in (str, int, float) for a in answer):
        raise ValueError("'answer' must be a list of facts (text or numbers)")
    return env.Task(_query_id(d), _get(d, "query", str),
                    [{k: f[k] for k in ("name", "description", "parameters")} for f in fs],
                    _texts(d, "relevant"), d["group"], {f["name"]: [f["category"], f["tool"], f["api"]] for f in fs},
                    [str(a) for a in answer], [_expert_step(k, s) for k, s in enumerate(_get(d, "expert", list, []))])


def _schema(f):
    """A function of the benchmark's 'functions': its schema, and the tool server's names for it."""
    if not (isinstance(f, dict) and all(isinstance(f.get(k), str) for k in ("name", "description", "category", "tool", "api"))
            and isinstance(f.get("parameters"), dict)):
        raise ValueError(f"function {str(f)[:60]!r}: needs text 'name', 'description', 'category', 'tool', 'api' "
                         "and an object 'parameters'")
    return f


def _expert_step(k, s):
    """An expert step {thought, name, arguments}: what SFT formats into an action."""
    if not (isinstance(s, dict) and isinstance(s.get("thought"), str) and isinstance(s.get("name"), str)
            and isinstance(s.get("arguments"), dict)):
        raise ValueError(f"expert step {k}: needs a string 'thought' and 'name' and an object 'arguments', got {str(s)[:80]}")
    return s


_PARAM_TYPES = {"NUMBER": "integer", "STRING": "string", "BOOLEAN": "boolean"}  # ToolBench's map; else string


def _stb_task(d, group):
    functions, api = [], {}
    for j, a in enumerate(_get(d, "api_list", list)):
        if not isinstance(a, dict):
            raise ValueError(f"api_list[{j}] must be an object")
        tool, api_name, category = (_get(a, k, str) for k in ("tool_name", "api_name", "category_name"))
        name = env.function_name(tool, api_name)
        params = {"type": "object", "properties": {}, "required": [], "optional": []}
        for kind in ("required", "optional"):
            for p in a.get(f"{kind}_parameters") or []:  # names and types as ToolBench shows them
                if not (isinstance(p, dict) and isinstance(p.get("name"), str)
                        and all(isinstance(p.get(k) or "", str) for k in ("type", "description"))):
                    raise ValueError(f"api_list[{j}]: each of '{kind}_parameters' needs a text 'name' (and text "
                                     "'type', 'description')")
                pname = env.change_name(env.standardize(p["name"]))
                params["properties"][pname] = {"type": _PARAM_TYPES.get(p.get("type"), "string"),
                                               "description": p.get("description") or ""}
                params[kind].append(pname)
        desc = a.get("api_description") or ""
        if not isinstance(desc, str):
            raise ValueError(f"api_list[{j}]: 'api_description' must be text")
        functions.append({"name": name, "description": desc[:256], "parameters": params})
        api[name] = [category, tool, api_name]
    pairs = _get(d, "relevant APIs", list, [])
    if not all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, str) for x in r) for r in pairs):
        raise ValueError("'relevant APIs' must be a list of [tool name, API name] pairs")
    return env.Task(_query_id(d), _get(d, "query", str), functions, [env.function_name(t, n) for t, n in pairs],
                    d.get("group", group), api)


def main(argv=None):
    """python -m harness.formats --tasks FILE [--show N]: the prompt (env.initial_messages) of the first N tasks."""
    ap = argparse.ArgumentParser(description="Render the prompt of tasks")
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--show", type=int, default=1, help="how many tasks to render")
    a = ap.parse_args(argv)
    for t in load_tasks(a.tasks)[:a.show]:
        for m in env.initial_messages(t):
            print(f"<{m['role']}>\n{m['content']}\n")


if __name__ == "__main__":
    main()
