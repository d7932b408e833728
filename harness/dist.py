"""Data parallel over torchrun's processes: the single-process update (Sec. 4.2), on N ranks.

    torchrun --standalone --nproc_per_node 8 steptool.py --model Qwen/Qwen2-7B ...   # one node, 8 GPUs
    python steptool.py ...                                  # one process: nothing here runs

Every rank runs the loop (harness/dist_train.py: steptool.train's N-rank copy); an iteration, on
each rank:
  1. the same B tasks are drawn (a function of (seed, iteration)); rank k rolls out its block of them,
     episodes B*k//N .. B*(k+1)//N - 1, each sampled from the generator of (seed, iteration, episode):
     the same episodes whatever N is;
  2. their step rewards are shaped on the rank (reward.py), with the judge if there is one;
  3. `Ranks.update`, ppo.update on N ranks: pi_old, pi_ref and V of the rank's own episodes; GAE per
     episode; the whitening mean and variance, the KL controller's mean KL and the logged means
     all-reduced over every rank's episodes; each optimizer step takes the same group of the global
     batch as one process would (the permutation is drawn from the same generator over the global
     episode order), each rank the group's episodes it holds, its loss divided by the group's global
     action-token and step counts; gradients summed over ranks by DDP or FSDP2, so clipping and Adam
     see one process's gradient;
  4. `Ranks.evaluate`, steptool.evaluate on N ranks: rank k rolls out and judges its block of the eval
     tasks; rank 0 scores the gathered labels;
  5. rank 0 alone writes metrics.jsonl, the log, checkpoints and the final model. A checkpoint holds
     full tensors, as one process writes it: it resumes on any number of ranks.
ppo.py and steptool.evaluate are one process's code, with no rank in them; Ranks.update and
Ranks.evaluate are their N-rank twins, built from ppo.py's pieces (units, collate, gae, the losses)
and kept equal to them by tests/test_dist.py (2 ranks against one process).
The embedded tool server is started once per node, by its local rank 0, which tells the node's other
ranks its URL (one server answers them all, as one process's server answers its batch).

Which wrapper (`Ranks.wrap`):
  LoRA -> DDP. Every rank holds the whole frozen base (bf16) with LoRA and the value head; DDP
    all-reduces the gradients of the few trainable weights (20 M for Qwen2-7B) in buckets during
    backward. Rollouts and the no-gradient passes (pi_old, pi_ref = LoRA off) need no communication.
  --full-finetune -> FSDP2 (`fully_shard`): pi_theta's fp32 master weights, their gradients and Adam's
    moments (16 B a weight) and the frozen pi_ref (4 B a weight) sharded over the ranks, one group per
    decoder layer of each model, the rest (embeddings, final norm, LM heads, value head) in the root
    group. Every forward all-gathers each layer's weights, so all ranks run the same number of
    forward passes: a rank with fewer mini-batches runs stand-ins whose loss is multiplied by 0. For
    sampling (rollouts, evaluation: a different number of decode steps on each rank) pi_theta's
    weights are gathered whole on every rank for the duration (`Ranks.sampling`).
  DDP for LoRA because the base fits on one GPU and sharding it would all-gather 15 GB per forward
  to save 13 GB; FSDP2 for full fine-tuning because its 152 GB do not fit on one.

Departures and shortcuts (the paper trains on one machine and says nothing of this):
1. Each rank's loss is its share of the optimizer step's token mean times N: DDP and FSDP2 average
   gradients over ranks, and N times the average of the shares is their sum. Gradients equal one
   process's up to float summation order (the tests: 2 ranks on CPU within 1e-5 of one process).
2. Mini-batches are cut from the rank's own episodes of a group (sorted by length, as ppo._chunks),
   not from the whole group: other padding, the same tokens, results equal up to float rounding.
3. SFT (the warm start) and RFT are not sharded: SFT runs whole on every rank before wrapping (the same
   steps, the same result); --algo rft is refused on more than one rank.
4. A non-finite loss on one rank skips the optimizer step on every rank (an all-reduced flag); one
   process stops computing the step's remaining mini-batches, N ranks compute them (the collectives
   must match).
5. The process group's timeout is 30 minutes (a rank waits that long for one writing a checkpoint);
   a rank that dies makes the others fail at their next collective, and torchrun stops them all
   (SIGTERM, which steptool.py turns into one line naming the checkpoint to resume from); the last
   checkpoint is whole (runs.py writes it under a temporary name).
6. FSDP2 all-gathers the fp32 master weights (no MixedPrecisionPolicy), so the compute is one
   process's bf16 autocast exactly; bf16 all-gathers would halve the traffic and the sampling copy.
   The root group holds both models' embeddings and LM heads (a tied embedding cannot be split over
   two groups): for Qwen2-7B 8.7 GB gathered in every forward.
Left out: tensor and pipeline parallelism; overlapping rollouts with updates (a rank with short
episodes waits for the slowest); multi-node runs are torchrun's own and need a shared file system
for --output (every rank reads the checkpoint it resumes from).
"""
import contextlib
import datetime
import gc
import os
import signal
import sys
import time
import warnings

import torch

import eval as evaluation
import ppo
import rollout
from harness import runs

# a 2-token episode (one context, one action token) that a rank runs, with weight 0, when it has fewer
# mini-batches than another: under FSDP2 every forward is a collective
STANDIN = rollout.Episode([0, 0], [False, True], [-1, 0], [0], [0.0])
STANDIN.old_logp = STANDIN.old_values = STANDIN.A = STANDIN.R = torch.zeros(1)
# the statistics Ranks.update sums over ranks (every rank the same keys, even one whose steps all skipped)
LOGGED = ("loss/policy", "loss/value", "loss/entropy", "ppo/ratio", "ppo/clipfrac", "ppo/approx_kl")


class Ranks:
    """Who this process is among torchrun's, and the few collectives the loop needs. One process:
    rank 0 of 1, every method the identity (update and evaluate: ppo.update, one block of tasks)."""

    def __init__(self, rank=0, world=1, local_rank=0, device=None):
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        self.ddp = None        # the DDP wrapper of the policy (LoRA)
        self.fsdp = False      # the policy is sharded by fully_shard (full fine-tuning)

    @property
    def main(self):
        return self.rank == 0

    @property
    def lockstep(self):
        """Every forward pass is a collective (FSDP2): every rank must run as many as the others."""
        return self.fsdp

    # ---- sharding and reductions ---------------------------------------------------------------
    def block(self, n, rank=None):
        """(lo, hi): the contiguous block of range(n) this rank (or `rank`) takes; sizes differ by at most 1."""
        r = self.rank if rank is None else rank
        return n * r // self.world, n * (r + 1) // self.world

    def sum(self, xs):
        """Numbers summed over ranks (float64; exact for counts). One process: xs as given."""
        if self.world == 1:
            return xs
        t = torch.tensor([float(x) for x in xs], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def max(self, n):
        if self.world == 1:
            return n
        t = torch.tensor([n], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def all_true(self, flag):
        return bool(self.max(int(not flag)) == 0) if self.world > 1 else flag

    def gather(self, obj):
        """[rank 0's obj, ..., rank N-1's obj] on every rank (pickled: small things only)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def mean(self, x):
        """The mean of a tensor or list over every rank's elements. One process: x.mean().item() or
        sum(x) / len(x), as ppo.py computes it."""
        if self.world == 1:
            return x.mean().item() if torch.is_tensor(x) else sum(x) / len(x)
        s, n = self.sum([x.double().sum().item() if torch.is_tensor(x) else sum(x), len(x)])
        return s / n if n else float("nan")

    def mean_std(self, a):
        """Mean and population std of a 1-d tensor over every rank's elements, in two all-reduces
        (the mean first, then the squared deviations from it: no cancellation)."""
        s, n = self.sum([a.double().sum().item(), a.numel()])
        mean = s / n
        ss, = self.sum([((a.double() - mean) ** 2).sum().item()])
        return mean, (ss / n) ** 0.5

    def weighted(self, pairs):
        """[(mean, weight)] of this rank -> the means over every rank, each weighted by its count (the
        rollout's reward means: over steps, calls or episodes). One process: the means as given."""
        if self.world == 1:
            return [m for m, _ in pairs]
        tot = self.sum([x for m, w in pairs for x in (m * w, w)])
        return [tot[2 * i] / tot[2 * i + 1] if tot[2 * i + 1] else 0.0 for i in range(len(pairs))]

    def from_node_leader(self, value):
        """The value of local rank 0 of this rank's node (torchrun numbers a node's ranks contiguously)."""
        return value if self.world == 1 else self.gather(value)[self.rank - self.local_rank]

    def first(self, fn):
        """fn() on rank 0 alone (claiming the run folder) -> its result there, None elsewhere. If it
        raises, every rank raises: rank 0 its exception, the others runs.RunError with its message."""
        if self.world == 1:
            return fn()
        out = err = None
        if self.main:
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 -- re-raised below, after the others know
                err = e
        msg = [f"{err}" if err is not None else None]
        torch.distributed.broadcast_object_list(msg, src=0)
        if err is not None:
            raise err
        if msg[0] is not None:
            raise runs.RunError(msg[0])
        return out

    def fail(self, prog, err):
        """A one-line error (rank 0 prints it), exit status 2 on every rank."""
        if self.main:
            print(f"{prog}: {err}", file=sys.stderr)
        sys.exit(2)

    # ---- the model --------------------------------------------------------------------------------
    def wrap(self, policy):
        """DDP (LoRA) or FSDP2 (full fine-tuning) around the policy, in place for FSDP2. Call after
        the SFT warm start and freeze_reference, before building the optimizer (FSDP2 replaces the
        parameters by sharded ones); ppo.make_optimizer then takes policy.parameters()."""
        if self.world == 1:
            return policy
        if policy.full_finetune:
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.tensor import init_device_mesh
            from transformers.modeling_layers import GradientCheckpointingLayer
            mesh = init_device_mesh(self.device.type, (self.world,))
            for model in (policy.model, policy.ref_model):      # one all-gather per decoder layer of pi_theta and pi_ref
                for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
                    fully_shard(layer, mesh=mesh, reshard_after_forward=True)
            fully_shard(policy, mesh=mesh, reshard_after_forward=True)   # the root: embeddings, norms, heads, V
            self.fsdp = True
            # FSDP2 takes the first module to run forward for its root: run the root once (a stand-in)
            c = ppo.collate([STANDIN], "step", policy.device)
            with torch.no_grad():
                policy(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # forward_sync_buffers=False: buffers (rotary tables) are the same on every rank; syncing
            # them in forward would make every forward a collective
            self.ddp = DDP(policy, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           forward_sync_buffers=False)
        return policy

    def module(self, policy):
        """What a forward whose backward trains is called on: the DDP wrapper, or the (sharded) policy."""
        return self.ddp if self.ddp is not None else policy

    def sync(self, last):
        """Gradient accumulation: DDP all-reduces only in the last backward of an optimizer step (its
        forward must run outside no_sync); FSDP2 reduce-scatters every backward (sharded gradients)."""
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    @contextlib.contextmanager
    def sampling(self, policy):
        """FSDP2: pi_theta's weights whole on every rank while it samples, so a rank decodes as many
        tokens as its episodes need, with no collective per forward; resharded after. Else nothing."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule
        ref = {id(m) for m in policy.ref_model.modules()}
        mods = [m for m in policy.modules() if isinstance(m, FSDPModule) and id(m) not in ref]
        for m in mods:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        try:
            yield
        finally:
            for m in mods:
                m.reshard()
                m.set_reshard_after_forward(True, recurse=False)

    def full_state(self, policy):
        """FSDP2: the policy's state dict as full CPU tensors on rank 0 (None elsewhere; a collective:
        every rank calls it), tied weights kept as one tensor. DDP and one process: None (the policy
        saves its own state_dict)."""
        if not self.fsdp:
            return None
        from torch.distributed.tensor import DTensor
        full, out = {}, {}
        for k, v in policy.state_dict(keep_vars=True).items():
            if id(v) not in full:
                full[id(v)] = (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            out[k] = full[id(v)]
        return out if self.main else None

    def optimizer_state(self, optimizer):
        """optimizer.state_dict(), with FSDP2's sharded moments as full CPU tensors (on rank 0; a
        collective): the same file as one process writes."""
        sd = optimizer.state_dict()
        if not self.fsdp:
            return sd
        from torch.distributed.tensor import DTensor
        state = {i: {k: (v.full_tensor().cpu() if isinstance(v, DTensor) else v) for k, v in s.items()}
                 for i, s in sd["state"].items()}
        return {"state": state, "param_groups": sd["param_groups"]} if self.main else None

    def load_optimizer_state(self, optimizer, sd):
        """A checkpoint's optimizer state (full tensors) into this rank's optimizer: FSDP2 takes each
        moment's shard of its parameter (every rank read the same file: no communication)."""
        if self.fsdp:
            from torch.distributed.tensor import distribute_tensor
            params = [p for g in optimizer.param_groups for p in g["params"]]
            sd = {**sd, "state": {i: {k: distribute_tensor(v.to(self.device), params[i].device_mesh, params[i].placements,
                                                           src_data_rank=None)
                                      if k != "step" and torch.is_tensor(v) and v.shape == params[i].shape else v
                                      for k, v in s.items()} for i, s in sd["state"].items()}}
        optimizer.load_state_dict(sd)

    # ---- PPO and evaluation on N ranks (ppo.update and steptool.evaluate of one process) ---------------
    @torch.no_grad()
    def prepare(self, policy, eps, cfg):
        """ppo.prepare of this rank's episodes; under FSDP2 (every forward a collective) a rank with fewer
        mini-batches than another then runs stand-ins, as many as the difference."""
        n = len(ppo._chunks(eps, cfg.mini_batch_size))
        extra = self.max(n) - n if self.lockstep else 0
        ppo.prepare(policy, eps, cfg)
        was = policy.training
        policy.eval()
        for _ in range(extra):
            c = ppo.collate([STANDIN], cfg.advantage, policy.device)
            policy(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])
            with policy.reference():
                policy(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])
        policy.train(was)

    def advantages(self, eps, beta, cfg):
        """ppo.advantages of this rank's episodes (GAE per episode), with the whitening mean and std and
        the logged means over every rank's units (ppo.py's departure 3); a rank may hold no episode."""
        rs = [ppo.unit_rewards(e, beta, cfg.advantage) for e in eps]
        r_list, kls = [r for r, _ in rs], [kl for _, kl in rs]
        U = max((len(r) for r in r_list), default=1)
        pad = lambda xs: torch.stack([torch.cat([x, x.new_zeros(U - len(x))]) for x in xs]) if xs else torch.zeros(0, U)  # [B, U]
        mask = pad([torch.ones(len(r)) for r in r_list])
        A, R = ppo.gae(pad(r_list), pad([e.old_values for e in eps]), mask, cfg.gamma, cfg.lam)
        if cfg.whiten:
            mean, std = self.mean_std(A[mask.bool()])
            A = (A - mean) / (std + 1e-8) * mask
        for b, (e, r) in enumerate(zip(eps, r_list)):
            e.A, e.R = A[b, :len(r)], R[b, :len(r)]
        step_r = torch.cat([torch.tensor(e.rewards, dtype=torch.float) for e in eps] or [torch.zeros(0)])
        return {"reward/step_mean": self.mean(step_r), "ppo/kl": self.mean(kls), "ppo/returns": self.mean(R[mask.bool()])}

    def update(self, policy, optimizer, eps, cfg, kl_ctl, gen=None):
        """ppo.update on N ranks. `eps` are this rank's episodes of the batch; the groups are drawn over
        the global batch (every rank's episodes in rank order: the batch's order) from the same `gen`,
        each rank computes the group's episodes it holds, and the counts N, U are the group's. One
        process: ppo.update itself."""
        if self.world == 1:
            return ppo.update(policy, optimizer, eps, cfg, kl_ctl, gen)
        eps = [e for e in eps if e.n_steps > 0]
        # (action tokens, units, tokens) of every rank's episodes; the global episode j is held by where[j]
        sizes = self.gather([(len(ppo.units(e, cfg.advantage)[0]), len(ppo.units(e, cfg.advantage)[1]), len(e.ids)) for e in eps])
        where = [(r, i) for r, s in enumerate(sizes) for i in range(len(s))]                 # j -> (rank, local index)
        size = [x for s in sizes for x in s]                                                 # j -> (N_j, U_j, T_j)
        if not where:
            return {"ppo/kl_coef": kl_ctl.beta, "ppo/skipped_updates": 0, "ppo/episodes": 0, "ppo/tokens": 0}
        t0 = time.perf_counter()
        self.prepare(policy, eps, cfg)
        t_prepare = time.perf_counter() - t0
        stats = self.advantages(eps, kl_ctl.beta, cfg)
        params = [p for p in policy.parameters() if p.requires_grad]
        model = self.module(policy)                                       # the DDP wrapper, or the sharded policy
        agg, skipped, n_tok, n_unit = {}, 0, 0, 0
        policy.train_without_dropout()
        group = cfg.mini_batch_size * cfg.grad_accum
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(len(where), generator=gen).tolist()
            for g in range(0, len(where), group):                          # one optimizer step per group
                grp = perm[g:g + group]
                N = sum(size[j][0] for j in grp)                               # action tokens of the step (every rank's)
                U = sum(size[j][1] for j in grp)                               # units (steps) of the step
                chunks = ppo._chunks([eps[where[j][1]] for j in grp if where[j][0] == self.rank], cfg.mini_batch_size)
                held = [sum(where[j][0] == r for j in grp) for r in range(self.world)]
                M = max(-(-h // cfg.mini_batch_size) for h in held)           # the most mini-batches a rank has
                optimizer.zero_grad(set_to_none=True)
                ok, sums = True, {}
                for k in range(M):
                    mb = chunks[k] if k < len(chunks) else None                 # None: a stand-in of weight 0
                    run = mb or [STANDIN]
                    with self.sync(last=k == M - 1):
                        c = ppo.collate(run, cfg.advantage, policy.device)
                        dev = policy.device
                        old_logp = torch.cat([e.old_logp for e in run]).to(dev)        # [N_mb]
                        old_V = torch.cat([e.old_values for e in run]).to(dev)         # [U_mb]
                        A_unit = torch.cat([e.A for e in run]).to(dev)                 # [U_mb]
                        R = torch.cat([e.R for e in run]).to(dev)                      # [U_mb]
                        A = A_unit[c["unit"]]                                          # [N_mb] step advantage -> each of its tokens
                        logp, V, ent = model(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"], entropy=cfg.ent_coef > 0)
                        pg, ratio = ppo.policy_loss(logp, old_logp, A, cfg.cliprange)
                        pg, vf = pg.sum(), ppo.value_loss(V, old_V, R, cfg.cliprange_value).sum()
                        en = ent.sum() if ent is not None else torch.zeros((), device=dev)
                        loss = (pg - cfg.ent_coef * en) / N + cfg.vf_coef * vf / U       # this mini-batch's share of the step's means
                        # DDP / FSDP2 average gradients over ranks: world x their average is their sum (departure 1)
                        loss = loss * (self.world if mb is not None else 0.0)
                        if not torch.isfinite(loss):
                            ok = False
                        loss.backward()           # even a non-finite one: the collectives must match (departure 4)
                    if mb is None or not ok:
                        continue
                    with torch.no_grad():
                        for key, v in {"loss/policy": pg, "loss/value": vf, "loss/entropy": en, "ppo/ratio": ratio.sum(),
                                       "ppo/clipfrac": ((ratio - 1).abs() > cfg.cliprange).float().sum(),
                                       "ppo/approx_kl": 0.5 * ((logp - old_logp) ** 2).sum()}.items():
                            sums[key] = sums.get(key, 0.0) + v
                ok = self.all_true(ok)                                         # a NaN on any rank skips the step on all
                norm = full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))) if ok else torch.tensor(float("nan"))
                if not ok or not torch.isfinite(norm):
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                optimizer.step()
                n_tok, n_unit = n_tok + N, n_unit + U
                for key in LOGGED:
                    agg[key] = agg.get(key, 0.0) + sums.get(key, 0.0)
        kl_ctl.update(stats["ppo/kl"], len(where))
        if agg:
            agg = dict(zip(agg, self.sum([float(v) for v in agg.values()])))
        stats.update({k: float(v) / max(n_unit if k == "loss/value" else n_tok, 1) for k, v in agg.items()})
        stats.update({"ppo/kl_coef": kl_ctl.beta, "ppo/skipped_updates": skipped, "ppo/episodes": len(where),
                      "ppo/tokens": sum(s[2] for s in size), "time/prepare_s": t_prepare,
                      "time/epochs_s": time.perf_counter() - t0 - t_prepare})
        return stats

    def evaluate(self, policy, tasks, client, cfg, judge):
        """steptool.evaluate on N ranks: each rolls out and judges its block of the tasks; rank 0 scores
        the gathered labels -> (scored, groups, eval.per_query, the trajectories) there, as steptool.evaluate,
        (None,) * 4 elsewhere."""
        lo, hi = self.block(len(tasks))
        with self.sampling(policy):
            trajs = evaluation.run_policy(policy, tasks[lo:hi], client, temperature=0.0, max_steps=cfg.max_steps, seed=cfg.seed,
                                          max_new_tokens=cfg.max_new_tokens, max_context=cfg.max_context,
                                          first_episode=lo, progress=self.main, obs_chars=cfg.obs_chars)
        repeats = 1 if all(t.answer or t.world for t in tasks) else 3
        labels, errors = {}, {}   # the judging on each rank, the scoring of the gathered labels on rank 0
        got = self.gather((judge(trajs, tasks[lo:hi], repeats), trajs))
        for (lab, err), _ in got:
            for into, part in ((labels, lab), (errors, err)):
                for g, entries in part.items():
                    into.setdefault(g, {}).update(entries)
        if not self.main:
            return None, None, None, None
        labels = dict(sorted(labels.items()))
        return (*evaluation.score_groups(labels, errors, tasks), evaluation.per_query(labels, tasks),
                [t for _, part in got for t in part])

    def close(self):
        """DDP's wrapper first, then the process group. DDP's reducer must not hold the group's last
        reference: it is freed holding the GIL, and gloo's destructor then waits for a worker thread
        that needs the GIL to free a finished collective's tensors: a hang at exit (seen on a loaded
        2-core CPU). Freed here, the wrapper leaves the group to destroy_process_group, whose binding
        releases the GIL."""
        if self.world > 1:
            self.ddp = None
            gc.collect()          # were the wrapper in a reference cycle, a later collection would free it: now
            torch.distributed.destroy_process_group()


ONE = Ranks()   # the single process


class Stopped(Exception):
    """SIGTERM on a rank: torchrun stops every rank when one of them fails."""


def _stopped(signum, frame):
    raise Stopped("stopped by SIGTERM (torchrun stops every rank when one fails)")


def lost_rank(e):
    """Is this exception another rank's end: torchrun's SIGTERM, a collective's DistError (NCCL, a
    timeout), or gloo's "Connection closed by peer" (a plain RuntimeError from its TCP transport)?"""
    return isinstance(e, (Stopped, torch.distributed.DistError)) or (isinstance(e, RuntimeError) and "gloo" in str(e))


def full(t):
    """A DTensor (FSDP2's gradient norm) as a plain tensor; anything else as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def init(device=""):
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) -> Ranks, with the default process group
    initialised: nccl on CUDA (this rank's GPU: cuda:LOCAL_RANK), gloo on CPU. Without torchrun, or
    with one process, the single process (nothing initialised)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (not device and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                         device_id=dev if cuda else None)
    # FSDP2 warns that Policy.forward returns views (gather/squeeze); nothing modifies them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    signal.signal(signal.SIGTERM, _stopped)   # steptool.py says which checkpoint to resume from
    return Ranks(rank, world, local, dev)
