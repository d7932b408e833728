"""Supervised fine-tuning on tool-use trajectories: StepTool's warm start and the RFT baseline (Sec. 5).

    loss = - mean over assistant tokens of log pi_theta(token | prefix)

Prompt and observation (tool response) tokens are context only: masked out of the loss, exactly
the tokens that PPO gives no gradient (Episode.act). The paper fine-tunes Qwen2 / Llama-3.1 on
ToolBench's solution paths before PPO; RFT (rejection-sampling fine-tuning) is the same loss on the
policy's own Solved trajectories.

    python sft.py --model M --data FILE --output DIR [--epochs 2] [--lr 1e-4] [--overwrite]

FILE is the original StepTool training TSV (its responses are the targets), or a task file with
expert trajectories (the embedded benchmark's data/bench_train.json), replayed through the
embedded tool server so the observations are the server's real answers.

The flags and FILE are checked first (FILE read whole: every TSV row, every expert step): a bad one
is one line naming the flag or the file (and line or item), exit status 2, before DIR is claimed.
DIR must be new, empty, or an earlier sft.py output (--overwrite replaces only what that wrote);
anything else is refused before a model loads (runs.py). The checkpoint is written into a hidden
temporary sub-folder and moved in, policy.json last: a crash never leaves a half checkpoint that loads.

Departures: none in the loss; batches are sorted by length inside each batch to save padding.
"""
import argparse
import math
import os
import sys

import torch
from tqdm import tqdm

import ppo
from harness import runs


def sft(policy, episodes, epochs=1, lr=1e-4, batch_size=16, micro_batch_size=8, seed=0, warmup=0.05,
        progress=True, desc="sft"):
    """Train on the action tokens of `episodes` (in place). Returns the mean loss of each epoch.

    lr: peak, with linear warm-up over `warmup` of the steps and cosine decay to 10 %.
    A non-finite loss or gradient skips that step; it never reaches the weights.
    """
    if not episodes or epochs < 1:
        raise ValueError(f"sft: nothing to train: {len(episodes)} episodes x {epochs} epochs")
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = epochs * math.ceil(len(episodes) / batch_size)
    w = max(1, int(warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / w) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))
    gen = torch.Generator().manual_seed(seed)
    policy.train()
    losses, skipped = [], 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    for epoch in range(epochs):
        perm = torch.randperm(len(episodes), generator=gen).tolist()
        tot, n = 0.0, 0
        for b in range(0, len(perm), batch_size):
            loss = sft_step(policy, opt, [episodes[i] for i in perm[b:b + batch_size]], micro_batch_size)
            skipped += loss is None
            sched.step()
            tot, n = tot + (loss or 0.0), n + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss or float('nan'):.3f}")
        losses.append(tot / max(n, 1))
    bar.close()
    if skipped:
        print(f"sft: skipped {skipped} steps with a non-finite loss or gradient")
    return losses


def sft_step(policy, optimizer, episodes, micro_batch_size=8):
    """One optimizer step on the token-mean loss over the action tokens of `episodes` -> the loss,
    or None when a non-finite loss or gradient skipped the step (nothing reaches the weights)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    n_tok = sum(sum(e.act) for e in episodes)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for mb in ppo._chunks(episodes, micro_batch_size):
        c = ppo.collate(mb, "step", policy.device)
        logp, _, _ = policy(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])
        loss = -logp.sum() / n_tok                                  # token mean over the whole batch
        if not torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            return None
        loss.backward()
        loss_sum += loss.item()
    if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0)):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return loss_sum


def read_data(path):
    """--data, read and checked whole before any model loads -> ("tsv", rows) or ("tasks", the tasks
    with an expert trajectory). A file we cannot use is a ValueError of one line naming it (and its
    line or item): formats.DataFileError for a TSV, env.TaskFileError for a task file (expert steps too)."""
    import env
    from harness import formats
    if path.lower().endswith(".tsv"):
        return "tsv", formats.read_tsv(path)
    tasks = [t for t in env.load_tasks(path) if t.expert]
    if not tasks:
        raise ValueError(f"{path}: no task has an expert trajectory to train on")
    return "tasks", tasks


def load_episodes(policy, data, max_tokens=None):
    """read_data's ("tsv", rows) or ("tasks", tasks) -> [Episode]: TSV rows tokenized, expert
    trajectories replayed through the embedded tool server."""
    kind, items = data
    if kind == "tsv":
        eps, dropped = ppo.episodes_from_rows(policy, items, max_tokens)
        if dropped:
            print(f"sft: {dropped} steps cut by --max-tokens")
        return eps
    import env
    import rollout
    from harness import server
    srv = server.start_in_thread()
    try:
        client = env.ToolClient(srv.url)
        return [rollout.expert_episode(policy, t, client)[0] for t in tqdm(items, desc="expert episodes", leave=False)]
    finally:
        srv.shutdown()


def main(argv=None):
    import policy as P
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="what policy.load_policy accepts")
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
    except ValueError as e:       # formats.DataFileError, env.TaskFileError: they name the file
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
            pol = P.load_policy(a.model, device=a.device, full_finetune=a.full_finetune, seed=a.seed)
            eps = load_episodes(pol, data, a.max_tokens)
            losses = sft(pol, eps, a.epochs, a.lr, a.batch_size, a.micro_batch_size, a.seed)
            print("sft: loss per epoch " + " ".join(f"{x:.4f}" for x in losses))
        except ValueError as e:   # a model that cannot be loaded (policy.load_policy): bad input, exit 2
            runs.fail("sft", e)
        try:
            runs.install(claimed[0], pol.save, last="policy.json")   # policy.json last: no half checkpoint loads
            if a.export:
                runs.install(claimed[1], pol.export_merged, last="config.json")
        except (runs.RunError, OSError) as e:  # a failure during the work (no space left): exit 1
            sys.exit(f"sft: {e}")
    finally:                                   # however it ends, the folders' locks go
        for run in claimed:
            run.release()
    print(f"sft: saved {a.output}" + (f", merged model {a.export}" if a.export else ""))


if __name__ == "__main__":
    runs.interruptible("sft", main, "nothing was saved (the checkpoint is written whole at the end)")
