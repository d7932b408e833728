"""eval.py's command line: flags, input files, the judges, the outputs in --out and the exit statuses.

    python eval.py --model M --tasks FILE ... | --answers FILE.json ... | --labels FILE.json ... | --bench
    (python eval.py -h lists the flags; eval.py's docstring defines the numbers and its departures)

--judge (judge.py): `facts`, the embedded benchmark's answer facts, locally (tasks without facts:
harness/judge.py's step annotator at --judge-url, our prompt); `stabletoolbench`, StableToolBench's decision chain
at --judge-url, with its own prompts from --stb-dir (else ours, every output marked not comparable);
`auto`: stabletoolbench when --judge-url is given and a task lacks facts. --answers judges saved
answers with the chain: StableToolBench's converted answers or label files (ours or theirs; their
is_solved ignored). Every path meets in StableToolBench's label file (formats.py), and only label
files are scored: --labels reads ours and theirs, theirs read ours. Outputs in --out (new, empty or
an earlier eval.py output; --overwrite replaces only what that wrote, runs.py): <group>.json label
files, results.json (the --json object, with the judge's model, endpoint, prompts and errors),
results.csv, and for --model trajectories.jsonl, written before judging.

Exit status: 0 done; 2 bad input, refused in one line before any rollout or judge request (a flag
out of its range or choices, flags that do not go together, a URL that is not http(s), a --tool-server
that does not answer, an input file that cannot be read, a group name that cannot name a label file,
a model or adapter that does not load: this one after --out is claimed); 1 a failure during the work
(judge errors, departure 6; a tool server lost mid-run). --labels scores each file on its own: one it
cannot read or score is named in one line and skipped, the others scored, and the status is 1.
A group name comes from data (a task file's `group`, --groups, a file stem) and names <group>.json in
--out, so it must be a plain name (runs.plain_name: a string, no '/', no NUL, not absolute) and not
results or .steptool-run; every file goes into --out through the run folder (runs.Run.path_of), which
refuses a path that resolves outside it.

Departures 3 and 5 of eval.py are made here: a label file's group is its file stem, or the
StableToolBench group the stem contains (label_group; --groups overrides); a malformed --labels file
is reported and skipped, the others still scored, while every --answers file is read whole and each
answer checked as the judge will read it, so a malformed one stops the run (status 2) before the
judge is asked anything.
"""
import argparse
import csv
import json
import os
import random
import sys
import statistics
import tempfile
import time
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

import env
from harness.checks import opt
import eval as E
from harness import formats, toolclient
from harness import judge as J
from harness import runs
from harness.formats import (MAX_REPEATS, STATUS, STB_GROUPS, LabelFileError, label_group, load_labels,
                             write_trajectories)

JSON_KEYS = ("pass_rate", "pass_rate_std", "n", "repeats", "recall")
DETAIL_KEYS = ("pass_rate_ci", "answer_status", "majority_pass_rate", "majority_pass_rate_ci", "judge_errors",
               "missing_repeats", "overridden", "recall_n")


# ---- --labels: score label files ----------------------------------------------------------------
def score_paths(label_paths, query_paths=(), group_names=()):
    """The --labels path: -> (scored [(path, group, metrics)], groups, errors [str]); bad files skipped."""
    errors, tasks = [], []
    for p in query_paths:
        try:
            tasks += read_tasks(p, "--queries")
        except (formats.TaskFileError, runs.RunError) as e:
            errors.append(str(e))
    relevant = E.relevant_index(tasks) if tasks else None
    scored = []
    for i, p in enumerate(label_paths):
        g = label_group(p, group_names[i] if group_names else None)
        try:
            scored.append((p, g, E.score_labels(load_labels(p), g, relevant)))
        except LabelFileError as e:
            errors.append(str(e))
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            # a value of the wrong type that load_labels let through (a `passed` that is text, a step
            # `name` that is a list): this file's error, and the other files are still scored
            errors.append(f"{p}: cannot be scored: {one_line(e)}")
    return scored, E.group_means(scored), errors


# ---- what is read from files: group names become file names in --out ------------------------
def one_line(e):
    """An exception nobody meant to raise, as one line: its type and message."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def label_file(group, what):
    """<group>.json, a group's label file in --out. A group name is read from data (a task file's
    `group`, --groups, a file stem), so it must be a plain name (runs.plain_name: no '/', no NUL, not
    absolute, a string) and not name a file that eval.py or runs.py writes for something else;
    else runs.RunError naming `what`."""
    name = runs.plain_name(runs.plain_name(group, what) + ".json", what)
    if name in ("results.json", runs.MARKER):
        raise runs.RunError(f"{what}: {group!r} would write its label file over {name}; rename the group")
    return name


def read_tasks(path, flag):
    """formats.load_tasks, each task's group checked as a label file's name (label_file) when it is read,
    before any rollout, judge request or write."""
    tasks = formats.load_tasks(path)
    for t in tasks:
        label_file(t.group, f"{flag} {path}: query {t.query_id}: group")
    return tasks


def read_answers(paths, group_names=()):
    """--answers files -> ([(group, query id, converted answer)], {group: file}), every file read and
    every answer checked whole before the judge is asked anything (departure 5): formats.load_answers,
    then what the judge will read of each answer (its steps, tool names, JSON text) read once here.
    LabelFileError naming the file (and the query); runs.RunError for a group that is no file name."""
    items, names = [], {}
    for i, p in enumerate(paths):
        g = label_group(p, group_names[i] if group_names else None)
        label_file(g, f"--answers {p}: group")
        if g in names:
            raise LabelFileError(f"--answers {names[g]} and {p} are both group {g}; give --groups, or one file a group")
        names[g] = p
        try:
            answers = formats.load_answers(p)
        except LabelFileError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
            raise LabelFileError(f"{p}: not a converted-answer or label file ({one_line(e)})") from None
        for qid, example in answers.items():
            try:   # what judge.PassRateJudge.judge and formats.label_entry do with it, minus the requests
                formats.label_entry(example, [])
                json.dumps(example)
            except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError) as e:
                raise LabelFileError(f"{p}: query {qid}: an answer the judge cannot read ({one_line(e)})") from None
            items.append((g, qid, example))
    return items, names


# ---- printing and writing --------------------------------------------------------------------
def _pct(x):
    return "-" if x is None else f"{x:.1f}"


def format_table(scored, groups, judge=None):
    """The paper's table as plain text: group | n | Pass Rate mean ± std | 95% CI | Recall, and notes."""
    dup = {g for _, g, _ in scored if sum(g == h for _, h, _ in scored) > 1}
    lines = [f"{'group':<24}{'n':>6}   {'Pass Rate (%)':<16}{'95% CI':<16}{'Recall (%)':>10}"]
    for name, g, m in scored:
        ci = m.get("pass_rate_ci")
        lines.append(f"{g + f' ({name})' if g in dup else g:<24}{m['n']:>6}   "
                     f"{_pct(m['pass_rate']) + ' ± ' + _pct(m['pass_rate_std']):<16}"
                     f"{f'[{ci[0]:.1f}, {ci[1]:.1f}]' if ci else '-':<16}{_pct(m['recall']):>10}")
    for g in [g for g in groups if g in E.PAPER_GROUPS or g == "Avg"]:
        lines.append(f"{g:<24}{'':>6}   {_pct(groups[g]['pass_rate']):<32}{_pct(groups[g]['recall']):>10}")
    for name, g, m in scored:  # what a reader comparing with StableToolBench's own printout should know
        notes = [f"{m['repeats']} judge repeats"] + [f"{k} {v}" for k, v in m["answer_status"].items()]
        if m["majority_pass_rate"] is not None:
            notes.append(f"majority pass rate {_pct(m['majority_pass_rate'])} % "
                         f"[{m['majority_pass_rate_ci'][0]:.1f}, {m['majority_pass_rate_ci'][1]:.1f}]")
        if m["judge_errors"]:
            notes.append(f"JUDGE ERRORS: {m['judge_errors']} queries (left out of n and the rate)")
        if m["missing_repeats"]:
            notes.append(f"queries lacking a repeat: {m['missing_repeats']} (Unsolved there)")
        if m["overridden"]:
            notes.append(f"labelled above Unsolved without Finish give_answer: {m['overridden']} (counted Unsolved)")
        if m["recall_n"] is not None and m["recall_n"] < m["n"]:
            notes.append(f"Recall over {m['recall_n']} of {m['n']} queries (no relevant APIs for the others)")
        lines.append(f"  {name}: " + "; ".join(notes))
    if dup:
        lines.append(f"  no group means: {', '.join(sorted(dup))} given by several files; score one model per call")
    if judge:
        lines.append(f"  judge: {judge['kind']}, {judge['model'] or '-'} at {judge['url'] or '-'}; prompts: {judge['prompts']}")
    return "\n".join(lines)


def to_json(scored, groups, judge=None, errors=None, benchmark=None):
    out = {"files": {name: {k: m[k] for k in JSON_KEYS} for name, _, m in scored}, "groups": groups,
           "detail": {name: {k: m.get(k) for k in DETAIL_KEYS} for name, _, m in scored}}
    if benchmark:  # the task files' benchmark and version (formats.benchmark)
        out["benchmark"] = benchmark
    if judge:
        out["judge"] = {**judge, "errors": errors or {}}
    return out


def write_outputs(out, labels, scored, groups, run=None, judge=None, errors=None, benchmark=None):
    """<out>/<group>.json label files (StableToolBench's layout: indent 4), results.json, results.csv.
    run: the claimed --out folder (runs.py): each path comes from run.path_of, which lists the file in
    its marker and refuses one that resolves outside the folder. Every name is checked (label_file)
    before anything is written: a group from data never names a path elsewhere (runs.RunError)."""
    os.makedirs(out, exist_ok=True)
    names = [label_file(g, "a label file's group") for g in labels] + ["results.json", "results.csv"]
    path = {n: run.path_of(n) if run is not None else os.path.join(out, n) for n in names}
    for n, entries in zip(names, labels.values()):
        with open(path[n], "w") as f:
            json.dump(entries, f, ensure_ascii=False, indent=4)
    with open(path["results.json"], "w") as f:
        json.dump(to_json(scored, groups, judge, errors, benchmark), f, indent=2)
    with open(path["results.csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "n", "repeats", "pass_rate", "pass_rate_std", "recall"])
        for _, g, m in scored:
            w.writerow([g, m["n"], m["repeats"], m["pass_rate"], m["pass_rate_std"], m["recall"]])
        for g in [g for g in groups if g in E.PAPER_GROUPS or g == "Avg"]:
            w.writerow([g, "", "", groups[g]["pass_rate"], "", groups[g]["recall"]])


# ---- the benchmark of the scorer -------------------------------------------------------------
def bench(runs=5):
    """Six synthetic label + query files, StableToolBench's group sizes (765 queries), ~1 KB responses."""
    rng, qid, paths = random.Random(0), 0, ([], [])
    with tempfile.TemporaryDirectory() as d:
        for g, n in zip(STB_GROUPS, [163, 153, 158, 106, 124, 61]):
            queries, labels = [], {}
            for qid in range(qid + 1, qid + n + 1):
                apis = [[f"Tool {qid % 7} {j}", f"api {k}"] for j in range(2) for k in range(3)]
                names = [env.function_name(t, a) for t, a in apis]
                queries.append({"query_id": qid, "query": "q", "relevant APIs": apis[:2], "api_list": [
                    {"category_name": "Data", "tool_name": t, "api_name": a} for t, a in apis]})
                response = lambda: json.dumps({"error": "", "response": "".join(rng.choices("ab ,:{}'", k=1000))})
                steps = [str({"name": rng.choice(names), "arguments": json.dumps({"x": rng.random()}),
                              "response": response()}) for _ in range(rng.randint(2, 8))]
                done = rng.random() < 0.7  # the others end without Finish: Unsolved, as StableToolBench labels them
                if done:
                    steps.append(str({"name": "Finish", "response": "", "arguments": json.dumps(
                        {"return_type": "give_answer", "final_answer": "an answer " * 20})}))
                solved = {str(r): rng.choice(list(STATUS)) if done else "AnswerStatus.Unsolved" for r in range(3)}
                labels[str(qid)] = {"query": "q", "tool_names": names + ["Finish"], "is_solved": solved,
                                    "answer_steps": "\n".join(f"Step {k}: {s}" for k, s in enumerate(steps, 1)),
                                    "final_step": "Final step: " + steps[-1], "length": len(steps)}
            for path, obj, out in ((f"{d}/{g}.json", labels, paths[0]), (f"{d}/{g}_q.json", queries, paths[1])):
                with open(path, "w") as f:
                    json.dump(obj, f, indent=4)
                out.append(path)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            scored, groups, errors = score_paths(*paths)
            times.append(time.perf_counter() - t0)
    assert not errors and sum(m["n"] for _, _, m in scored) == 765
    print(format_table(scored, groups))
    print(f"bench: 6 label files, 765 queries, Pass Rate and Recall: "
          f"median {statistics.median(times):.3f} s of {runs} runs")
    return statistics.median(times)


# ---- command line ----------------------------------------------------------------------------
@dataclass
class Args:
    model: str = opt("", "policy: what harness.models.load_policy accepts, or a checkpoint folder of ours")
    adapters: tuple = opt((), "adapter files (LoRA + value head) put on --model in order, each but the last merged")
    dtype: str = opt("auto", "float32, bfloat16, or auto: bf16 on CUDA and on a CPU with native bf16 (measured), else fp32")
    tasks: tuple = opt((), "task files: StableToolBench query files or data/bench_test.json")
    tool_server: str = opt("", "tool server URL; empty: start the embedded one")
    judge: str = opt("auto", "facts | stabletoolbench | auto (stabletoolbench if --judge-url and a task lacks facts)")
    judge_url: str = opt("", "OpenAI-compatible judge endpoint, e.g. https://api.openai.com/v1")
    judge_model: str = opt("gpt-4o-mini", "model name sent to the judge (StableToolBench's: gpt-4-turbo-2024-04-09)")
    judge_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the judge's key (never logged)")
    stb_dir: str = opt("", "a StableToolBench checkout: its pass-rate prompts, read at run time; empty: ours")
    judge_temperature: float = opt(0.0, "judge sampling temperature (StableToolBench's default config: 0.2)")
    judge_retries: int = opt(2, "retries per judge request (0 to 20), with exponential backoff from 1 s")
    judge_timeout: float = opt(60.0, "seconds per judge request (at most 86400)")
    judge_workers: int = opt(8, "judge requests in flight")
    repeats: int = opt(3, "judge repeats per answer (StableToolBench's evaluate_times)")
    temperature: float = opt(0.0, "sampling temperature; 0 = greedy, as the paper")
    max_steps: int = opt(12, "actions per episode")
    max_new_tokens: int = opt(256, "tokens per assistant turn (below the 4096-token context)")
    obs_chars: int = opt(1024, "tool responses are cut to this many characters (steptool.py's --obs-chars of the run)")
    seed: int = opt(0, "rollout seed, and the seed of the judge's coin flips (>= 0)")
    out: str = opt("out/eval", "folder for label files, results.json/.csv (and trajectories.jsonl): new or empty")
    overwrite: bool = opt(False, "replace an earlier eval.py output in --out (only what it wrote)")
    answers: tuple = opt((), "judge these saved answers (StableToolBench converted answers or label files)")
    labels: tuple = opt((), "score these StableToolBench pass-rate label files instead")
    queries: tuple = opt((), "query files whose 'relevant APIs' give Recall of --labels / --answers")
    groups: tuple = opt((), "group names for the --labels / --answers files, one per file")
    json: bool = opt(False, "--labels / --answers: print one JSON object as the last line")
    bench: bool = opt(False, "time --labels on six synthetic files (765 queries)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=E.__doc__.split("\n")[0])   # `python eval.py -h`
    ap.error = lambda message: runs.fail("eval.py", f"{message} (see -h)")   # one line, status 2, as every refusal
    for f in fields(Args):
        kw = {"action": "store_true"} if f.type is bool else {"nargs": "+"} if f.type is tuple else {"type": f.type}
        ap.add_argument("--" + f.name.replace("_", "-"), default=f.default, help=f.metadata["help"], **kw)
    return Args(**vars(ap.parse_args(argv)))


def flat(e):
    return " ".join(str(e).splitlines())


def refuse(e):
    """Bad input: one line on stderr, status 2 (runs.fail), before any rollout or judge request."""
    runs.fail("eval.py", flat(e))


def check_flags(a):
    """The flags alone, before any file is read: one mode and the flags it takes, each number within its
    range, URLs that are http(s) URLs, --groups names that can name label files. checks.InputError or
    runs.RunError, one line."""
    from harness import checks
    modes = [m for m, given in (("--bench", a.bench), ("--labels", a.labels), ("--answers", a.answers),
                                ("--model/--tasks", a.model or a.tasks)) if given]
    if len(modes) != 1:
        raise checks.InputError("give --model and --tasks, or --answers, or --labels, or --bench (see -h)"
                                + (f"; got {' and '.join(modes)}, one of them at a time" if modes else ""))
    if bool(a.model) != bool(a.tasks):
        raise checks.InputError("--model needs --tasks" if a.model else "--tasks needs --model")
    if a.adapters and not a.model:
        raise checks.InputError("--adapters go on --model; --answers and --labels load no model")
    if a.queries and a.model:
        raise checks.InputError("--queries give Recall of --labels / --answers; --model's comes from --tasks")
    if a.groups and len(a.groups) != len(a.labels or a.answers):
        raise checks.InputError(f"--groups gives {len(a.groups)} names for {len(a.labels or a.answers)} "
                                "--labels / --answers files")
    for g in a.groups:
        label_file(g, "--groups")
    checks.check_ranges(a, {**{k: checks.RULES[k] for k in ("temperature", "max_steps", "obs_chars")},
                            "max_new_tokens": checks.rule(1, E.MAX_CONTEXT - 1),   # a turn must fit in the context
                            "judge_temperature": checks.NONNEG, "judge_retries": checks.rule(0, 20),
                            "judge_timeout": checks.rule(0, 86400, lo_open=True), "judge_workers": checks.ONE_UP,
                            "repeats": checks.rule(1, MAX_REPEATS - 1), "seed": checks.NONNEG})
    checks.check_choice(a, "dtype")
    if a.judge not in ("auto", "facts", "stabletoolbench"):
        raise checks.InputError(f"--judge {a.judge}: use one of auto, facts, stabletoolbench")
    if a.answers and (a.judge == "facts" or not a.judge_url):
        raise checks.InputError("--answers needs --judge-url (and --judge auto or stabletoolbench): saved answers "
                                "have no answer facts")
    for name, url in (("--judge-url", a.judge_url), ("--tool-server", a.tool_server)):
        u = urlsplit(url)
        if url and not (u.scheme in ("http", "https") and u.netloc):
            raise checks.InputError(f"{name} {url}: not an http:// or https:// URL")


def main(argv=None):
    """eval.main: -> the exit status. argv None: the command itself (python eval.py), so Ctrl-C or SIGTERM
    ends it in one line, status 130 (runs.interruptible)."""
    if argv is None:
        return runs.interruptible("eval.py", lambda: run(sys.argv[1:]),
                                  "nothing of this evaluation was written (--out is written at the end)")
    return run(argv)


def run(argv):
    a = parse_args(argv)
    try:
        check_flags(a)
    except (ValueError, runs.RunError) as e:
        refuse(e)
    if a.bench:
        return 0 if bench() < 2.0 else 1
    if a.labels:  # scores what it can: a file it cannot read is named, skipped, and makes the status 1
        scored, groups, errors = score_paths(a.labels, a.queries, a.groups)
        print(format_table(scored, groups))
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        if a.json:
            print(json.dumps(to_json(scored, groups)))
        return 1 if errors else 0
    from harness import checks
    try:  # input files, the tool server and the judge's prompts before the --out folder, the model or the judge
        if not a.answers:
            checks.check_model(a.model, a.adapters)
        flag = "--queries" if a.answers else "--tasks"
        tasks = [t for p in (a.queries if a.answers else a.tasks) for t in read_tasks(p, flag)]
        if not (tasks or a.answers):
            raise checks.InputError(f"--tasks {' '.join(a.tasks)}: no tasks")
        items, names = read_answers(a.answers, a.groups) if a.answers else ([], None)   # every file, whole
        chain = a.judge == "stabletoolbench" or (a.judge == "auto" and a.judge_url and (
            a.answers or not all(t.answer or t.world for t in tasks)))
        if chain and not a.judge_url:
            raise checks.InputError("--judge stabletoolbench needs --judge-url")
        if not a.judge_url and not all(t.answer or t.world for t in tasks):   # never a constant 0.5 called a pass rate
            raise checks.InputError(f"--tasks {' '.join(a.tasks)}: {sum(not (t.answer or t.world) for t in tasks)} tasks have no answer "
                                    "facts to judge by: give --judge-url")
        kw = dict(key_env=a.judge_key_env, timeout=a.judge_timeout, retries=a.judge_retries)
        judge = J.PassRateJudge(a.judge_url, a.judge_model, a.stb_dir, a.judge_temperature, **kw) if chain \
            else J.FactsJudge(a.judge_url, a.judge_model, **kw)
        if a.tool_server and not a.answers:
            toolclient.ToolClient(a.tool_server).check()   # a --tool-server that does not answer: before the model loads
    except (ValueError, runs.RunError, toolclient.ToolServerError) as e:
        # checks.InputError, formats.TaskFileError, formats.LabelFileError, a bad --stb-dir, a group that is no file name
        refuse(e)
    try:  # --out first (runs.py): never a folder of someone else's, nothing loaded before
        run = runs.claim(a.out, "eval", "--out", overwrite=a.overwrite, entries=() if a.answers else ("trajectories.jsonl",))
    except runs.RunError as e:
        refuse(e)
    with run:
        try:
            return judge_and_write(a, run, tasks, items, names, chain, judge)
        except (toolclient.ToolServerError, runs.RunError) as e:   # a failure during the work: status 1, one line
            print(f"eval.py: {flat(e)}", file=sys.stderr)
            return 1


def judge_and_write(a, run, tasks, items, names, chain, judge):
    """The work, once every input is checked: rollouts (--model), the judge, the outputs in --out. -> status."""
    if not a.answers:
        trajectories = evaluate_model(a, tasks)
        write_trajectories(run.path_of("trajectories.jsonl"), trajectories)  # kept if judging fails
    if chain and not a.answers:  # the model's answers, judged as saved answers are
        by_key = {(t.group, t.query_id): t for t in tasks}
        items = [(t.group, t.query_id, formats.traj_to_example(by_key[(t.group, t.query_id)], t)) for t in trajectories]
    if chain:
        labels, errors = J.judge_answers(items, judge, a.repeats, a.seed, a.judge_workers)
        scored, groups = E.score_groups(labels, errors, tasks, names)
    else:
        errors = {}
        labels, scored, groups = J.evaluate(trajectories, tasks, judge, a.repeats, errors=errors)
    info = {**judge.describe(), "repeats": a.repeats, "seed": a.seed}  # the seed of the coin flips
    bench = ", ".join(sorted({formats.benchmark(p) for p in (a.queries if a.answers else a.tasks)}))
    write_outputs(a.out, labels, scored, groups, run, info, errors, bench)
    print(format_table(scored, groups, info))
    print(f"wrote {a.out}/results.json, results.csv, {'' if a.answers else 'trajectories.jsonl, '}"
          f"{len(labels)} label files")
    if a.json:
        print(json.dumps(to_json(scored, groups, info, errors, bench)))
    return 1 if errors else 0


def evaluate_model(a, tasks):
    """--model's rollouts on --tasks (the embedded tool server unless --tool-server) -> [env.Trajectory]."""
    srv = None
    if not a.tool_server:
        from harness import server
        srv = server.start_in_thread()
    try:
        from harness import models
        try:  # a model or adapter file that does not load is bad input (status 2, as sft.py); nothing rolled out yet
            dtype, why = models.pick_dtype(a.dtype, models.default_device())
            print(f"dtype: {str(dtype).removeprefix('torch.')} ({why})")
            model = models.for_sampling_only(models.load_policy(a.model, dtype=dtype, adapters=tuple(a.adapters)))
        except (ValueError, OSError, runs.RunError) as e:
            refuse(e)
        return E.run_policy(model, tasks, toolclient.ToolClient(a.tool_server or srv.url), a.temperature, a.max_steps, a.seed,
                          max_new_tokens=a.max_new_tokens, obs_chars=a.obs_chars)
    finally:
        if srv:
            srv.shutdown()
