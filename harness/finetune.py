"""sft.py's command line: the flags, --data read and checked whole, the output folders, the model, the checkpoint.

    python sft.py --model M --data FILE --output DIR [--epochs 2] [--lr 1e-4] [--overwrite]

The flags and FILE are checked first (FILE read whole: every TSV row, every expert step): a bad one
is one line naming the flag or the file (and line or item), exit status 2, before DIR is claimed.
DIR must be new, empty, or an earlier sft.py output (--overwrite replaces only what that wrote);
anything else is refused before a model loads (runs.py). The checkpoint is written into a hidden
temporary sub-folder and moved in, policy.json last: a crash never leaves a half checkpoint that loads.
"""
import argparse
import math
import os
import sys

import torch
from tqdm import tqdm

import env
import rollout
import sft
from harness import formats, toolclient
from harness import models
from harness import offline
from harness import runs


def read_data(path):
    """--data, read and checked whole before any model loads -> ("tsv", rows) or ("tasks", the tasks
    with an expert trajectory). A file we cannot use is a ValueError of one line naming it (and its
    line or item): formats.DataFileError for a TSV, formats.TaskFileError for a task file (expert steps too)."""
    if path.lower().endswith(".tsv"):
        return "tsv", formats.read_tsv(path)
    tasks = [t for t in formats.load_tasks(path) if t.expert]
    if not tasks:
        raise ValueError(f"{path}: no task has an expert trajectory to train on")
    return "tasks", tasks


def load_episodes(policy, data, max_tokens=None):
    """read_data's ("tsv", rows) or ("tasks", tasks) -> [Episode]: TSV rows tokenized, expert
    trajectories replayed through the embedded tool server."""
    kind, items = data
    if kind == "tsv":
        eps, dropped = offline.episodes_from_rows(policy, items, max_tokens)
        if dropped:
            print(f"sft: {dropped} steps cut by --max-tokens")
        return eps
    from harness import server
    srv = server.start_in_thread()
    try:
        client = toolclient.ToolClient(srv.url)
        return [rollout.expert_episode(policy, t, client)[0] for t in tqdm(items, desc="expert episodes", leave=False)]
    finally:
        srv.shutdown()


def main(argv=None):
    """sft.main. argv None: the command itself (python sft.py), so Ctrl-C or SIGTERM ends it in one line,
    status 130 (runs.interruptible)."""
    if argv is None:
        return runs.interruptible("sft", lambda: run(sys.argv[1:]),
                                  "nothing was saved (the checkpoint is written whole at the end)")
    return run(argv)


def run(argv):
    ap = argparse.ArgumentParser(description=sft.__doc__.split("\n")[0])   # `python sft.py -h`
    ap.add_argument("--model", required=True, help="what harness.models.load_policy accepts")
    ap.add_argument("--data", required=True, help="StepTool TSV, or a task file with expert trajectories")
    ap.add_argument("--output", required=True, help="checkpoint folder (ours; load_policy reads it): new or empty")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier sft.py output (only what it wrote)")
    ap.add_argument("--epochs", type=int, default=2, help="passes over --data (at least 1)")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (> 0)")
    ap.add_argument("--batch-size", type=int, default=16, help="episodes per optimizer step (at least 1)")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="episodes per forward/backward (at least 1)")
    ap.add_argument("--max-tokens", type=int, default=4096, help="cut TSV trajectories to their last N tokens (0: none)")
    ap.add_argument("--full-finetune", action="store_true", help="train every weight instead of LoRA")
    ap.add_argument("--export", help="also write a merged save_pretrained model here (new or empty)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device")
    a = ap.parse_args(argv)
    # the flags, then --data read whole and checked: a bad one is one line (exit 2), before any folder or model
    for flag, value, ok, need in (("--epochs", a.epochs, a.epochs >= 1, "at least 1"),
                                  ("--lr", a.lr, 0 < a.lr < math.inf, "a finite number > 0"),
                                  ("--batch-size", a.batch_size, a.batch_size >= 1, "at least 1"),
                                  ("--micro-batch-size", a.micro_batch_size, a.micro_batch_size >= 1, "at least 1"),
                                  ("--max-tokens", a.max_tokens, a.max_tokens >= 0, "at least 0 (0: no cut)")):
        if not ok:
            runs.fail("sft", f"{flag} {value}: must be {need}")
    try:
        data = read_data(a.data)
    except ValueError as e:       # formats.DataFileError, formats.TaskFileError: they name the file
        runs.fail("sft", f"--data {e}")
    from harness import checks
    try:
        checks.check_model(a.model)  # a path-like --model that is not there: never probed as a Hub id
    except checks.InputError as e:
        runs.fail("sft", e)
    # then claim the folders (runs.py): never a user's folder, never deleted, before any model loads
    claimed = []
    try:
        if a.export and os.path.abspath(a.export) == os.path.abspath(a.output):
            raise runs.RunError(f"--export {a.export}: the same folder as --output; give another")
        claimed.append(runs.claim(a.output, "sft", overwrite=a.overwrite, inputs=(a.model, a.data)))
        if a.export:
            claimed.append(runs.claim(a.export, "sft", "--export", overwrite=a.overwrite, inputs=(a.model, a.data)))
    except runs.RunError as e:
        for run in claimed:
            run.release()
        runs.fail("sft", e)
    try:
        try:
            torch.manual_seed(a.seed)
            pol = models.load_policy(a.model, device=a.device, full_finetune=a.full_finetune, seed=a.seed)
            eps = load_episodes(pol, data, a.max_tokens)
            losses = sft.sft(pol, eps, a.epochs, a.lr, a.batch_size, a.micro_batch_size, a.seed)
            print("sft: loss per epoch " + " ".join(f"{x:.4f}" for x in losses))
        except ValueError as e:   # a model that cannot be loaded (models.load_policy): bad input, exit 2
            runs.fail("sft", e)
        try:
            runs.install(claimed[0], lambda path: models.save_policy(pol, path), last="policy.json")   # policy.json last: no half checkpoint loads
            if a.export:
                runs.install(claimed[1], lambda path: models.export_merged(pol, path), last="config.json")
        except (runs.RunError, OSError) as e:  # a failure during the work (no space left): exit 1
            sys.exit(f"sft: {e}")
    finally:                                   # however it ends, the folders' locks go
        for run in claimed:
            run.release()
    print(f"sft: saved {a.output}" + (f", merged model {a.export}" if a.export else ""))
