"""Data parallel over torchrun's processes (harness/dist.py), on CPU with gloo, 2 processes, tiny models.

Two ranks compute what one process computes: Ranks.update what ppo.update does (DDP for LoRA, FSDP2
for full fine-tuning: the same weights after it, the same statistics), Ranks.evaluate what
steptool.evaluate does (the same scores, the same per-task scores), and `torchrun --nproc_per_node 2 steptool.py` the same metrics as `python steptool.py` on the
same global batch. A killed rank stops the run with a clear error and a whole checkpoint, which
resumes on 2 ranks and ends with one process's metrics and checkpoint.

Tolerance: float metrics and weights within 1e-5 + 1e-4 |x| of one process's (summation order, the
whitening's float64 reductions and the padding differ). Measured on this CPU: at most 8e-7 on the
metrics (ppo/kl, loss/policy), 1.2e-7 on the checkpoint's weights, 2.2e-7 on its Adam moments, 9e-8
on the statistics of the update alone. Counts (tokens, steps, episodes), Pass Rate and Recall are
equal exactly.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from harness import toolclient
from test_steptool import ENV, SMALL_RUN, metrics

ABS, REL = 1e-5, 1e-4
# 3 episodes per iteration (the ranks hold 2 and 1), mini-batches of 1, 2 per optimizer step: two
# optimizer steps per epoch, the second of one episode, for which the other rank runs a stand-in
BATCH = [*SMALL_RUN, "--episodes-per-iteration", "3", "--mini-batch-size", "1", "--grad-accum", "2",
         "--iterations", "2", "--save-every", "1", "--sft-episodes", "8"]


def close(a, b):
    return abs(a - b) <= ABS + REL * abs(a)


def assert_same_metrics(one, two):
    assert [m["iteration"] for m in one] == [m["iteration"] for m in two]
    for a, b in zip(one, two):
        assert set(a) == set(b), set(a) ^ set(b)
        for k in a:
            exact = k.startswith(("rollout/", "eval/", "ppo/episodes", "ppo/tokens", "episodes", "iteration"))
            assert (a[k] == b[k]) if exact else close(a[k], b[k]), (a["iteration"], k, a[k], b[k])


def torchrun(*args, timeout=300):
    """`torchrun --nproc_per_node 2 steptool.py ARGS`; past `timeout` every rank is killed (a session of
    their own: killing torchrun alone would leave them running) and the test fails with their output."""
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "steptool.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT, env=ENV, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"torchrun {' '.join(args)}: still running after {timeout} s\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def one_process(*args):
    import steptool
    steptool.main(list(args))


# ---- the update and the evaluation, rank by rank (torch.multiprocessing, gloo) ------------------
def tiny_policy(full_finetune):
    """A 2-layer, 32-wide random Qwen2 (seed 0) with a 3-token tokenizer; LoRA r 4, or every weight."""
    import policy as P
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, tie_word_embeddings=True, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.config.use_cache = False
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<|im_start|>": 0, "<|im_end|>": 1, "a": 2},
                                                                              unk_token="a")),
                                  eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=P.CHAT_TEMPLATE)
    lora = None if full_finetune else dict(r=4, alpha=8, dropout=0.0, targets=list(P.LORA_TARGETS))
    if lora:
        model.requires_grad_(False)
        P.inject_lora(model, 4, 8, 0.0)
    torch.manual_seed(1)
    return P.Policy(model, tok, "tiny", lora, full_finetune)


def batch(n=5, nan=False):
    """n episodes of different lengths and step counts, random rewards (one NaN with nan=True)."""
    import rollout
    g = torch.Generator().manual_seed(2)
    eps = []
    for i in range(n):
        ep = rollout.Episode()
        ep.add_context(torch.randint(3, 64, (5 + 3 * i,), generator=g).tolist())
        for _ in range(1 + i % 3):
            ep.add_action(torch.randint(3, 64, (4 + i,), generator=g).tolist())
            ep.add_context(torch.randint(3, 64, (3,), generator=g).tolist())
        ep.rewards = torch.rand(ep.n_steps, generator=g).tolist()
        eps.append(ep)
    if nan:
        eps[3].rewards[0] = float("nan")
    return eps


def run_update(ranks, full_finetune, nan=False):
    """One PPO update (2 epochs, 3 optimizer steps each) of this rank's block of the batch, SGD so that
    the weights move by the gradient itself -> (stats, the policy's full state dict on rank 0). One
    process: ppo.update; 2 ranks: Ranks.update."""
    from harness import dist
    import ppo
    ranks = dist.Ranks(ranks.rank, ranks.world, ranks.local_rank, ranks.device)   # one per policy, as one per run
    pol = tiny_policy(full_finetune)
    pol.freeze_reference()
    eps = batch(nan=nan)
    lo, hi = ranks.block(len(eps))
    ranks.wrap(pol)
    cfg = ppo.PPOConfig(batch_size=5, mini_batch_size=1, grad_accum=2, ppo_epochs=2)
    opt = torch.optim.SGD([p for p in pol.parameters() if p.requires_grad], lr=0.1)
    update = ppo.update if ranks.world == 1 else ranks.update
    stats = update(pol, opt, eps[lo:hi], cfg, ppo.KLController(cfg), torch.Generator().manual_seed(3))
    stats = {k: v for k, v in stats.items() if not k.startswith("time/")}
    return stats, ranks.full_state(pol) if ranks.fsdp else pol.state_dict()


def run_roundtrip(ranks):
    """FSDP2's Adam moments through a checkpoint: gathered whole (rank 0 writes them), read back into a
    new optimizer on the sharded weights (every rank reads the file), gathered again."""
    from harness import dist
    import ppo
    ranks = dist.Ranks(ranks.rank, ranks.world, ranks.local_rank, ranks.device)
    pol = tiny_policy(True)
    pol.freeze_reference()
    ranks.wrap(pol)
    cfg = ppo.PPOConfig(batch_size=5, mini_batch_size=1, grad_accum=2, ppo_epochs=1, lr=1e-3)
    opt = ppo.make_optimizer(pol, cfg)
    lo, hi = ranks.block(5)
    ranks.update(pol, opt, batch()[lo:hi], cfg, ppo.KLController(cfg), torch.Generator().manual_seed(3))
    saved = ranks.gather(ranks.optimizer_state(opt))[0]           # state.pt, as every rank reads it
    again = ppo.make_optimizer(pol, cfg)
    ranks.load_optimizer_state(again, saved)
    return saved, ranks.optimizer_state(again)


def replay(policy, tasks, client, first_episode=0, **kw):
    """eval.run_policy's stand-in: each task's expert trajectory through the server, cut to its first
    step for odd episodes (unsolved, partial recall): Pass Rates strictly between 0 and 100."""
    import env
    out = []
    for i, t in enumerate(tasks):
        e = env.ToolEnv(client)
        e.reset(t)
        for s in t.expert if (first_episode + i) % 2 == 0 else t.expert[:1]:
            e.step(env.format_action(s["thought"], s["name"], s["arguments"]))
        out.append(e.traj)
    return out


def run_evaluate(ranks, url, out):
    """12 test tasks (4 per group), eval.run_policy replaced by `replay` -> ({group: {pass_rate, recall}},
    each task's score and recall): Ranks.evaluate on 2 ranks, steptool.evaluate's record in one process."""
    import env
    import steptool
    from harness import formats, judge, launch
    tasks = launch.limit_per_group(formats.load_tasks(os.path.join(ROOT, "data", "bench_test.json")), 4)
    cfg, client, eval_judge = steptool.Config(output=out), toolclient.ToolClient(url), judge.labeller(judge.FactsJudge("", "x"))
    if ranks.world > 1:
        scored, groups, each, trajs = ranks.evaluate(None, tasks, client, cfg, eval_judge)
        assert not ranks.main or sorted(t.query_id for t in trajs) == sorted(t.query_id for t in tasks)
        rec = steptool.eval_record(scored, groups, each, 0.0) if ranks.main else {"eval/tasks": None}
    else:
        rec = steptool.evaluate(None, tasks, client, cfg, eval_judge)
    scores = {}
    for k, v in rec.items():          # eval/GROUP/pass_rate, eval/GROUP/recall
        if k.startswith("eval/") and k not in ("eval/tasks", "eval/trajectories"):
            group, metric = k[len("eval/"):].rsplit("/", 1)
            scores.setdefault(group, {})[metric] = v
    return scores, rec["eval/tasks"]


def _worker(rank, port, url, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from harness import dist
    ranks = dist.init("cpu")
    import eval as evaluation
    evaluation.run_policy = replay           # this process only
    res = {"lora": run_update(ranks, False), "full": run_update(ranks, True), "nan": run_update(ranks, False, nan=True),
           "eval": run_evaluate(ranks, url, os.path.join(out, "run")), "roundtrip": run_roundtrip(ranks)}
    if ranks.main:
        torch.save(res, os.path.join(out, "two_ranks.pt"))
    ranks.close()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tool_server):
    """What 2 gloo ranks computed, and the folder rank 0 wrote into."""
    import torch.multiprocessing as mp
    out = str(tmp_path_factory.mktemp("ranks"))
    os.makedirs(os.path.join(out, "run"))
    mp.spawn(_worker, args=(free_port(), tool_server.url, out), nprocs=2)
    return torch.load(os.path.join(out, "two_ranks.pt"), weights_only=False), out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close_cycles(rank, port, cycles):
    """`cycles` times over: a gloo group, a run's DDP wrapper, a few gathers, Ranks.close(), the Ranks dropped."""
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel as DDP
    from harness import dist
    store = torch.distributed.TCPStore("127.0.0.1", port, 2, rank == 0)
    for c in range(cycles):
        torch.distributed.init_process_group("gloo", store=torch.distributed.PrefixStore(f"{c}/", store), rank=rank, world_size=2)
        ranks = dist.Ranks(rank, 2, rank, torch.device("cpu"))
        ranks.ddp = DDP(torch.nn.Linear(16, 16))
        for i in range(5):
            ranks.gather({"i": i, "x": list(range(50))})
        ranks.close()
        del ranks


def test_ranks_closed_and_dropped_again_and_again_never_hang():
    # DDP's reducer, freed after the group is destroyed, drops its last reference holding the GIL; gloo's
    # destructor then waits for a worker thread that needs the GIL (steptool.py hung at exit). With DDP
    # freed after destroy_process_group, this test hung in its second cycle (2-core AMD EPYC, torch 2.13).
    import torch.multiprocessing as mp
    ctx = mp.start_processes(_close_cycles, args=(free_port(), 20), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("two ranks closing their group 20 times over still run after 120 s: a hang at close")


def assert_same_update(one, two):
    (s1, w1), (s2, w2) = one, two
    assert set(s1) == set(s2) and all(close(s1[k], s2[k]) for k in s1), {k: (s1[k], s2[k]) for k in s1 if not close(s1[k], s2[k])}
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=ABS, rtol=REL), (k, (w1[k] - w2[k]).abs().max().item())


def test_two_ranks_with_ddp_make_the_single_process_lora_update(two_ranks):
    one = run_update(__import__("harness.dist").dist.ONE, False)
    assert_same_update(one, two_ranks[0]["lora"])
    start = tiny_policy(False)
    start.freeze_reference()
    assert any(not torch.equal(v, one[1][k]) for k, v in start.state_dict().items())   # the update moved the weights


def test_two_ranks_with_fsdp2_make_the_single_process_full_finetuning_update(two_ranks):
    one = run_update(__import__("harness.dist").dist.ONE, True)
    assert_same_update(one, two_ranks[0]["full"])
    assert one[0]["ppo/skipped_updates"] == 0 and one[0]["ppo/episodes"] == 5


def test_a_non_finite_loss_skips_the_step_on_every_rank_as_in_one_process(two_ranks):
    one = run_update(__import__("harness.dist").dist.ONE, False, nan=True)
    two = two_ranks[0]["nan"]
    assert one[0]["ppo/skipped_updates"] == two[0]["ppo/skipped_updates"] == 6   # 2 epochs x 3 steps, no hang
    start = tiny_policy(False)
    start.freeze_reference()
    assert all(torch.equal(v, two[1][k]) for k, v in start.state_dict().items())  # no NaN reached the weights


def test_fsdp2_adam_moments_read_back_from_a_checkpoint_are_the_ones_written(two_ranks):
    saved, again = two_ranks[0]["roundtrip"]
    assert saved["param_groups"] == again["param_groups"] and len(saved["state"]) == len(again["state"]) > 0
    assert all(torch.equal(saved["state"][i][k], again["state"][i][k]) for i in saved["state"] for k in saved["state"][i])
    assert any(v.abs().sum() > 0 for s in saved["state"].values() for k, v in s.items() if k == "exp_avg")


def test_evaluation_sharded_over_two_ranks_scores_as_one_process(two_ranks, tool_server, tmp_path, monkeypatch):
    from harness import dist
    import eval as evaluation
    monkeypatch.setattr(evaluation, "run_policy", replay)
    one = run_evaluate(dist.ONE, tool_server.url, str(tmp_path))
    scores, each = two_ranks[0]["eval"]
    assert scores == one[0] and 0 < one[0]["overall"]["pass_rate"] < 100
    assert each == one[1] and len(each) > 0      # eval_tasks.json's tasks: each task's score and recall


# ---- steptool.py under torchrun --------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, small_model):
    d = tmp_path_factory.mktemp("lora")
    one_process("--model", small_model, *BATCH, "--output", str(d / "one"))
    r = torchrun("--model", small_model, *BATCH, "--output", str(d / "two"))
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def test_torchrun_with_two_ranks_ends_with_the_metrics_of_one_process_on_the_same_global_batch(lora_runs):
    one, two = metrics(lora_runs / "one"), metrics(lora_runs / "two")
    assert_same_metrics(one, two)
    assert [m["rollout/sampled_tokens"] for m in two[1:]] == [m["rollout/sampled_tokens"] for m in one[1:]]  # same episodes
    assert os.path.isfile(lora_runs / "two" / "adapter.safetensors")
    with open(lora_runs / "one" / "eval_tasks.json") as f, open(lora_runs / "two" / "eval_tasks.json") as g:
        assert json.load(f) == json.load(g)                      # rank 0 wrote one process's per-task scores


def rank_pid(run_dir, rank):
    """The pid of torchrun's worker RANK for the run writing to run_dir."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if str(run_dir).encode() in cmd and f"RANK={rank}".encode() in environ and any(
                e.startswith(b"TORCHELASTIC_RUN_ID=") for e in environ):
            return int(pid)
    raise AssertionError(f"no rank {rank} for {run_dir}")


@pytest.fixture(scope="module")
def killed(tmp_path_factory, small_model):
    """Full fine-tuning (FSDP2) on 2 ranks, rank 1 killed once iteration 1's checkpoint is on disk ->
    (the run folder, the exit status, what torchrun and the ranks printed)."""
    cut = tmp_path_factory.mktemp("full") / "cut"
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          os.path.join(ROOT, "steptool.py"), "--model", small_model, *BATCH, "--full-finetune",
                          "--output", str(cut)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in p.stdout:
        out.append(line)
        if line.startswith("iter    1"):
            st = cut / "checkpoint" / "state.pt"
            deadline = time.time() + 60
            while time.time() < deadline and not (st.is_file() and torch.load(st, weights_only=True)["iteration"] == 1):
                time.sleep(0.05)
            os.kill(rank_pid(cut, 1), signal.SIGKILL)
            break
    out.append(p.stdout.read())
    p.wait(timeout=120)
    return cut, p.returncode, "".join(out)


def test_a_killed_rank_stops_the_run_with_a_clear_error_and_an_intact_checkpoint(killed):
    cut, rc, text = killed
    assert rc != 0 and "Signal 9 (SIGKILL)" in text and "rank      : 1" in text, text[-3000:]   # torchrun's report
    assert f"The last checkpoint in {cut} is intact; continue with torchrun ... steptool.py --resume {cut}" in text  # rank 0's
    from harness import models
    models.load_policy(str(cut / "checkpoint"))                    # whole
    assert torch.load(cut / "checkpoint" / "state.pt", weights_only=True)["iteration"] == 1
    assert [m["iteration"] for m in metrics(cut)] == [0, 1]


def test_the_killed_run_resumed_on_two_ranks_ends_with_the_metrics_and_checkpoint_of_one_process(killed, small_model, tmp_path):
    cut = killed[0]
    r = torchrun("--resume", str(cut))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout
    one_process("--model", small_model, *BATCH, "--full-finetune", "--output", str(tmp_path / "one"))
    assert_same_metrics(metrics(tmp_path / "one"), metrics(cut))
    a, b = (torch.load(d / "checkpoint" / "policy.pt") for d in (tmp_path / "one", cut))
    assert list(a) == list(b) and all(torch.allclose(a[k], b[k], atol=ABS, rtol=REL) for k in a)
    sa, sb = (torch.load(d / "checkpoint" / "state.pt", weights_only=True)["optimizer"] for d in (tmp_path / "one", cut))
    assert sa["param_groups"] == sb["param_groups"] and list(sa["state"]) == list(sb["state"])   # one file for any N
    # Adam's moments by each tensor's norm, not element by element: weights a rounding apart can flip a token
    # across PPO's clip and switch its gradient on or off (up to 0.5 % of a moment's norm, measured on an AVX-512
    # Xeon), while a lost or doubled reduction moves it by tens of per cent
    pairs = [(sa["state"][i][k].float(), sb["state"][i][k].float()) for i in sa["state"] for k in sa["state"][i]]
    assert all(float((x - y).norm()) <= 2e-2 * float(x.norm()) for x, y in pairs)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(cut / "final_model"))   # rank 0 wrote a whole model


def test_what_several_ranks_do_not_run_is_refused_before_anything_loads():
    from harness import checks, dist, launch
    two = dist.Ranks(0, 2, 0, torch.device("cpu"))
    with pytest.raises(checks.InputError, match="--algo rft runs in one process only"):
        launch.check_ranks(launch.parse_args(["--algo", "rft"]), two)
    with pytest.raises(checks.InputError, match="--device cuda: this run's ranks were started on cpu"):
        launch.check_ranks(launch.parse_args(["--device", "cuda"]), two)
    launch.check_ranks(launch.parse_args(["--algo", "rft"]), dist.ONE)     # one process: all of it
    assert dist.ONE.block(7) == (0, 7) and [two.block(7, r) for r in (0, 1)] == [(0, 3), (3, 7)]
