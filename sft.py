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

The command line (flags, FILE, DIR, the checkpoint) is harness/finetune.py: FILE is read and checked
whole before DIR is claimed or a model loads, and the checkpoint is written whole, policy.json last.

Departures: none in the loss; batches are sorted by length inside each batch to save padding.
"""
import math

import torch
from tqdm import tqdm

import ppo


def sft(policy, episodes, epochs=1, lr=1e-4, batch_size=16, micro_batch_size=8, seed=0, warmup=0.05,
        progress=True, desc="sft", checkpoint=None):
    """Train on the action tokens of `episodes` (in place). Returns the mean loss of each epoch.

    lr: peak, with linear warm-up over `warmup` of the steps and cosine decay to 10 %.
    A non-finite loss or gradient skips that step; it never reaches the weights.
    checkpoint (harness/launch.py): .load(opt, sched) -> the steps a killed run had taken, .step(k, ...) after each.
    """
    if not episodes or epochs < 1:
        raise ValueError(f"sft: nothing to train: {len(episodes)} episodes x {epochs} epochs")
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(len(episodes), generator=gen).tolist() for _ in range(epochs)]   # each epoch's order
    batches = [(e, p[b:b + batch_size]) for e, p in enumerate(perms) for b in range(0, len(p), batch_size)]
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total, w = len(batches), max(1, int(warmup * len(batches)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / w) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))
    done = checkpoint.load(opt, sched) if checkpoint else 0
    policy.train()
    losses, skipped = [[] for _ in range(epochs)], 0
    bar = tqdm(total=total, initial=done, desc=desc, disable=not progress, leave=False)
    for step, (epoch, idx) in enumerate(batches[done:], done + 1):
        loss = sft_step(policy, opt, [episodes[i] for i in idx], micro_batch_size)
        skipped += loss is None
        sched.step()
        losses[epoch].append(loss or 0.0)
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{loss or float('nan'):.3f}")
        if checkpoint:
            checkpoint.step(step, opt, sched)
    bar.close()
    if skipped:
        print(f"sft: skipped {skipped} steps with a non-finite loss or gradient")
    return [sum(x) / len(x) if x else float("nan") for x in losses]


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


def main(argv=None):
    from harness import finetune  # flags, --data, the output folders, the model, the checkpoint
    return finetune.main(argv)


if __name__ == "__main__":
    main()
