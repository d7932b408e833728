"""Specification of ppo.py (step-grained GAE, the clipped losses, the update, the KL controller), of
harness/offline.py (TSV episodes) and of rollout.py (batched episodes against the embedded tool
server), on a ~0.2 M-parameter Qwen2 (conftest.make_policy). Numbers in the GAE tests are worked out
by hand in the comments."""
import copy
import os

import pytest
import torch

import env
import policy as P
import ppo
import rollout
from conftest import FIXTURES, SMALL
from harness import dist, formats, models, offline
from harness import toolclient


def episode(*parts, rewards=()):
    """An Episode from ('c', ids) context and ('a', ids) action parts."""
    ep = rollout.Episode()
    for kind, ids in parts:
        (ep.add_action if kind == "a" else ep.add_context)(list(ids))
    ep.rewards = list(rewards)
    return ep


def random_episode(g, n_prompt, steps, rewards, vocab=2048):
    """A prompt, then (action, observation) pairs of the given lengths; ids avoid the 3 special tokens."""
    r = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
    parts = [("c", r(n_prompt))]
    for n_act, n_obs in steps:
        parts += [("a", r(n_act))] + ([("c", r(n_obs))] if n_obs else [])
    return episode(*parts, rewards=rewards)


def cfg(**kw):
    """One mini-batch per update unless told otherwise; no KL penalty; one epoch."""
    base = dict(batch_size=2, mini_batch_size=2, grad_accum=1, ppo_epochs=1, init_kl_coef=0.0, lr=1e-3)
    return ppo.PPOConfig(**{**base, **kw})


# ---- GAE over steps (Eq. 5-6) -------------------------------------------------------------------
R3, V3 = [1.0, 0.0, 2.0], [0.5, 1.0, 1.5]
# gamma = lam = 1: delta = [1 + 1.0 - 0.5, 0 + 1.5 - 1.0, 2 + 0 - 1.5] = [1.5, 0.5, 0.5];
#   A = suffix sums = [2.5, 1.0, 0.5]; R = A + V = [3.0, 2.0, 2.0] (= the undiscounted reward-to-go)
# gamma = 0.9, lam = 0.8 (gamma * lam = 0.72): delta = [1 + 0.9 - 0.5, 0 + 1.35 - 1.0, 2 - 1.5] = [1.4, 0.35, 0.5];
#   A2 = 0.5, A1 = 0.35 + 0.72 * 0.5 = 0.71, A0 = 1.4 + 0.72 * 0.71 = 1.9112; R = [2.4112, 1.71, 2.0]
HAND = {(1.0, 1.0): ([2.5, 1.0, 0.5], [3.0, 2.0, 2.0]),
        (0.9, 0.8): ([1.9112, 0.71, 0.5], [2.4112, 1.71, 2.0])}


@pytest.mark.parametrize("gamma,lam", list(HAND))
def test_step_gae_matches_hand_computed_three_step_episode(gamma, lam):
    A, R = ppo.gae(torch.tensor([R3]), torch.tensor([V3]), torch.ones(1, 3), gamma, lam)
    torch.testing.assert_close(A[0], torch.tensor(HAND[gamma, lam][0]))
    torch.testing.assert_close(R[0], torch.tensor(HAND[gamma, lam][1]))


def test_gae_on_a_batch_of_different_lengths_matches_each_alone_and_padding_does_not_leak():
    # episode 2: r = [0.5, 1.0], V = [0.2, 0.4]; gamma 0.9, lam 0.8:
    #   delta = [0.5 + 0.36 - 0.2, 1.0 - 0.4] = [0.66, 0.6]; A = [0.66 + 0.72 * 0.6, 0.6] = [1.092, 0.6]; R = [1.292, 1.0]
    # Its padded third unit holds garbage (r = V = 100): with mask 0 it must not reach A or R.
    r = torch.tensor([R3, [0.5, 1.0, 100.0]])
    V = torch.tensor([V3, [0.2, 0.4, 100.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    A, R = ppo.gae(r, V, mask, 0.9, 0.8)
    torch.testing.assert_close(A, torch.tensor([HAND[0.9, 0.8][0], [1.092, 0.6, 0.0]]))
    torch.testing.assert_close(R, torch.tensor([HAND[0.9, 0.8][1], [1.292, 1.0, 0.0]]))


def test_last_step_bootstraps_from_zero_value():
    A, R = ppo.gae(torch.tensor([[3.0]]), torch.tensor([[5.0]]), torch.ones(1, 1), 0.99, 0.95)
    assert A.item() == -2.0 and R.item() == 3.0  # delta = r - V(s_0) + gamma * 0


# ---- rewards, KL penalty and advantages per unit ------------------------------------------------
def two_step_episode():
    """prompt 2 | action 2 | observation 3 | action 1: action tokens at positions 2, 3 and 7."""
    ep = episode(("c", [5, 6]), ("a", [7, 8]), ("c", [9, 10, 11]), ("a", [12]), rewards=[1.0, 2.0])
    ep.old_logp, ep.ref_logp = torch.tensor([-1.0, -2.0, -1.5]), torch.tensor([-1.5, -2.0, -1.0])  # KL/token [0.5, 0, -0.5]
    return ep


def test_step_mode_subtracts_each_steps_summed_kl_then_runs_gae_over_steps():
    ep = two_step_episode()
    assert ppo.units(ep, "step")[1].tolist() == [1, 6]  # V(s_t) read at the token before each action
    ep.old_values = torch.tensor([0.1, 0.3])
    # beta 0.1: r = [1.0 - 0.1 * (0.5 + 0), 2.0 - 0.1 * (-0.5)] = [0.95, 2.05]
    # delta = [0.95 + 0.9 * 0.3 - 0.1, 2.05 - 0.3] = [1.12, 1.75]; A = [1.12 + 0.72 * 1.75, 1.75] = [2.38, 1.75]
    ppo.advantages([ep], 0.1, cfg(gamma=0.9, lam=0.8, whiten=False))
    torch.testing.assert_close(ep.A, torch.tensor([2.38, 1.75]))
    torch.testing.assert_close(ep.R, torch.tensor([2.48, 2.05]))


def test_token_mode_puts_each_step_reward_on_its_last_action_token_and_skips_observation_tokens():
    ep = two_step_episode()
    pos, vpos, unit, last = ppo.units(ep, "token")
    assert pos.tolist() == [2, 3, 7] and vpos.tolist() == [1, 2, 6] and unit.tolist() == [0, 1, 2] and last.tolist() == [1, 2]
    ep.old_values = torch.tensor([0.1, 0.2, 0.3])
    # beta 0.1, per-token KL [0.5, 0, -0.5]: r = [-0.05, 0 + 1.0, 0.05 + 2.0] (rewards on tokens 3 and 7)
    # the 3 observation tokens between units 1 and 2 are not units: one factor gamma * lam between them, not four
    # delta = [-0.05 + 0.9 * 0.2 - 0.1, 1.0 + 0.9 * 0.3 - 0.2, 2.05 - 0.3] = [0.03, 1.07, 1.75]
    # A = [0.03 + 0.72 * 2.33, 1.07 + 0.72 * 1.75, 1.75] = [1.7076, 2.33, 1.75]
    ppo.advantages([ep], 0.1, cfg(gamma=0.9, lam=0.8, whiten=False, advantage="token"))
    torch.testing.assert_close(ep.A, torch.tensor([1.7076, 2.33, 1.75]))
    torch.testing.assert_close(ep.R, torch.tensor([1.8076, 2.53, 2.05]))


def test_whitened_advantages_have_zero_mean_and_unit_std_over_the_batchs_steps():
    a, b = two_step_episode(), episode(("c", [5]), ("a", [6, 7, 8]), rewards=[-1.0])
    b.old_logp = b.ref_logp = torch.zeros(3)
    a.old_values, b.old_values = torch.tensor([0.1, 0.3]), torch.tensor([0.0])
    ppo.advantages([a, b], 0.0, cfg())
    A = torch.cat([a.A, b.A])  # each step counted once, whatever its number of tokens
    assert abs(A.mean().item()) < 1e-6 and abs(A.std(unbiased=False).item() - 1) < 1e-5


def test_collate_maps_every_action_token_to_its_steps_unit_across_the_batch():
    a = two_step_episode()
    b = episode(("c", [5]), ("a", [6, 7, 8]), rewards=[0.0])
    c = ppo.collate([a, b], "step", "cpu")
    assert c["act_idx"][0].tolist() == [0, 0, 0, 1, 1, 1] and c["act_idx"][1].tolist() == [2, 3, 7, 1, 2, 3]
    assert c["act_tok"].tolist() == [7, 8, 12, 6, 7, 8]
    assert c["unit"].tolist() == [0, 0, 1, 2, 2, 2]  # b's single step is unit 2 of the flat batch
    assert c["v_idx"][0].tolist() == [0, 0, 1] and c["v_idx"][1].tolist() == [1, 6, 0]
    assert c["mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4]


# ---- the clipped losses (Eq. 7) -----------------------------------------------------------------
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clipped_surrogate_stops_the_gradient_past_1_plus_minus_eps_in_the_advantages_direction(sign):
    rho = torch.tensor([0.5, 1.0, 1.5])
    logp = torch.log(rho).requires_grad_()
    loss, ratio = ppo.policy_loss(logp, torch.zeros(3), torch.full((3,), sign), 0.2)
    loss = loss.mean()
    loss.backward()
    torch.testing.assert_close(ratio, rho)
    if sign > 0:  # A > 0: max(-rho, -clip(rho)) = [-0.5, -1, -1.2]; the gain of rho = 1.5 is capped at 1.2
        torch.testing.assert_close(loss, torch.tensor(-2.7 / 3))
        torch.testing.assert_close(logp.grad, torch.tensor([-0.5 / 3, -1 / 3, 0.0]))  # d/dlogp of -A rho / 3 = -A rho / 3
    else:         # A < 0: max(rho, clip(rho)) = [0.8, 1, 1.5]; the loss of rho = 0.5 is capped at 0.8
        torch.testing.assert_close(loss, torch.tensor(3.3 / 3))
        torch.testing.assert_close(logp.grad, torch.tensor([0.0, 1 / 3, 1.5 / 3]))


def test_clipped_value_loss_stops_the_gradient_of_a_value_that_moved_past_eps_v_towards_the_return():
    V = torch.tensor([0.5, 0.1, -0.5], requires_grad=True)
    # V_old = 0, R = 1, eps_v = 0.2: (V - R)^2 = [0.25, 0.81, 2.25]; V_clip = [0.2, 0.1, -0.2] -> [0.64, 0.81, 1.44]
    # loss = 0.5 * mean([0.64, 0.81, 2.25]) = 3.7 / 6
    loss = ppo.value_loss(V, torch.zeros(3), torch.ones(3), 0.2).mean()
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(3.7 / 6))
    # V0 moved 0.5 towards R: the clipped term wins and does not depend on V; V1 inside; V2 moved away: unclipped
    torch.testing.assert_close(V.grad, torch.tensor([0.0, (0.1 - 1) / 3, (-0.5 - 1) / 3]))


# ---- the KL controller --------------------------------------------------------------------------
def test_adaptive_kl_coefficient_rises_above_target_falls_below_and_holds_at_it():
    c = ppo.PPOConfig(init_kl_coef=0.3, target_kl=6.0, horizon=100)
    for kl, factor in ((12.0, 1 + 0.2 * 8 / 100), (6.6, 1 + 0.1 * 8 / 100), (6.0, 1.0), (3.0, 1 - 0.2 * 8 / 100)):
        ctl = ppo.KLController(c)
        ctl.update(kl, 8)
        assert ctl.beta == pytest.approx(0.3 * factor), kl


def test_fixed_kl_coefficient_never_moves():
    ctl = ppo.KLController(ppo.PPOConfig(init_kl_coef=0.3, adaptive_kl=False))
    for kl in (0.0, 100.0):
        ctl.update(kl, 8)
    assert ctl.beta == 0.3


# ---- the update ---------------------------------------------------------------------------------
def two_episodes(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [random_episode(g, 12, [(5, 7), (4, 0)], [1.0, -0.5]),
            random_episode(g, 9, [(6, 6), (3, 5), (4, 0)], [0.0, 0.5, 1.0])]


def test_prompt_and_observation_tokens_get_no_gradient_only_action_predicting_and_value_positions_do(make_policy):
    pol = make_policy()
    eps = two_episodes()
    grads = []
    def keep_grad(mod, inp, out):  # the final hidden states [B, T, H]; prepare() runs without grad
        if out.requires_grad:
            out.register_hook(grads.append)
    pol.model.model.norm.register_forward_hook(keep_grad)
    ppo.update(pol, ppo.make_optimizer(pol, cfg()), eps, cfg(vf_coef=0.1), ppo.KLController(cfg()))
    (g,) = grads
    for row, ep in enumerate(sorted(eps, key=lambda e: len(e.ids))):  # a mini-batch is sorted by length
        # h[p - 1] predicts token p: it gets the policy gradient iff p is an action token; V reads h[state_end]
        used = {p - 1 for p, a in enumerate(ep.act) if a} | set(ep.state_end)
        for p in range(g.shape[1]):
            nonzero = bool(g[row, p].abs().sum() > 0)
            assert nonzero == (p in used), (row, p, p < len(ep.ids) and ep.act[p])
    assert g.shape[1] == max(len(e.ids) for e in eps)


def test_first_minibatch_has_ratio_one_and_policy_loss_minus_mean_token_advantage(make_policy):
    pol = make_policy(lora_dropout=0.0)
    eps = two_episodes()
    stats = ppo.update(pol, ppo.make_optimizer(pol, cfg()), eps, cfg(), ppo.KLController(cfg()))  # one mini-batch
    assert stats["ppo/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert stats["ppo/approx_kl"] < 1e-12 and stats["ppo/clipfrac"] == 0.0
    A_tok = torch.cat([e.A[ppo.units(e, "step")[2]] for e in eps])  # each action token carries its step's A
    assert stats["loss/policy"] == pytest.approx(-A_tok.mean().item(), abs=1e-6)
    assert abs(stats["loss/policy"]) > 1e-3  # whitened step advantages, but a token mean: not zero by itself


def randomize_lora(pol, scale=0.1):
    """A trained-looking adapter (B != 0), so dropout on the LoRA path would change the log-probs."""
    g = torch.Generator().manual_seed(3)
    for m in pol.lora_modules():
        m.B.data = torch.randn(m.B.shape, generator=g) * scale


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_ratio_is_exactly_one_before_the_first_step_even_with_lora_dropout(make_policy, checkpointing):
    pol = make_policy(lora_dropout=0.05)
    randomize_lora(pol)
    if checkpointing:
        pol.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    pol.model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    c = cfg(mini_batch_size=1, grad_accum=2, ppo_epochs=2, lr=0.0)  # lr 0: every step leaves pi_theta = pi_old
    stats = ppo.update(pol, ppo.make_optimizer(pol, c), two_episodes(), c, ppo.KLController(c))
    assert stats["ppo/ratio"] == 1.0 and stats["ppo/approx_kl"] == 0.0 and stats["ppo/clipfrac"] == 0.0
    # prepare: 2 episodes x (pi_old, pi_ref); update: 2 epochs x 2 mini-batches, recomputed in backward when checkpointing
    assert len(calls) == 4 + 4 * (2 if checkpointing else 1)


def test_the_loss_weighs_every_action_token_of_an_optimizer_step_the_same_whatever_its_mini_batch(make_policy):
    g = torch.Generator().manual_seed(0)
    eps = [random_episode(g, 12, [(24, 7), (20, 0)], [1.0, -0.5]),   # 44 action tokens
           random_episode(g, 9, [(2, 6), (1, 0)], [0.0, 1.0])]      # 3 action tokens
    after, stats, start = [], [], make_policy(seed=5)
    randomize_lora(start)
    for mb, accum in ((2, 1), (1, 2)):                                # one mini-batch of 2, or 2 accumulated
        pol = copy.deepcopy(start)
        c = cfg(mini_batch_size=mb, grad_accum=accum, vf_coef=0.5, max_grad_norm=0.0)
        opt = torch.optim.SGD([p for p in pol.parameters() if p.requires_grad], lr=0.5)
        batch = [rollout.Episode(e.ids, e.act, e.step, e.state_end, e.rewards) for e in eps]
        stats.append(ppo.update(pol, opt, batch, c, ppo.KLController(c)))
        after.append({k: v.detach().clone() for k, v in pol.named_parameters() if v.requires_grad})
    for k in after[0]:
        torch.testing.assert_close(after[0][k], after[1][k], atol=1e-6, rtol=1e-5)
    for k in ("loss/policy", "loss/value"):
        assert stats[0][k] == pytest.approx(stats[1][k], rel=1e-5, abs=1e-7)
    A_tok = torch.cat([e.A[ppo.units(e, "step")[2]] for e in batch])  # ratio 1: the loss is -mean of all tokens' A
    assert stats[1]["loss/policy"] == pytest.approx(-A_tok.mean().item(), abs=1e-6)


def frozen_update(pol, opt, eps, c, beta, gen):
    """The single-process update's arithmetic written out once more and frozen (step advantages, no
    entropy): every op in ppo.update's order, so its weights must come out bit for bit the same."""
    ppo.prepare(pol, eps, c)
    ppo.advantages(eps, beta, c)
    pol.train_without_dropout()
    params = [p for p in pol.parameters() if p.requires_grad]
    G = c.mini_batch_size * c.grad_accum
    for _ in range(c.ppo_epochs):
        perm = torch.randperm(len(eps), generator=gen).tolist()
        for g in range(0, len(eps), G):
            grp = sorted([eps[j] for j in perm[g:g + G]], key=lambda e: len(e.ids))   # mini-batches by length
            N, U = sum(sum(e.act) for e in grp), sum(e.n_steps for e in grp)
            opt.zero_grad(set_to_none=True)
            for k in range(0, len(grp), c.mini_batch_size):
                mb = grp[k:k + c.mini_batch_size]
                b = ppo.collate(mb, "step", pol.device)
                logp, V, _ = pol(b["ids"], b["mask"], b["act_idx"], b["act_tok"], b["v_idx"], entropy=False)
                old_logp, old_V = torch.cat([e.old_logp for e in mb]), torch.cat([e.old_values for e in mb])
                A, R = torch.cat([e.A for e in mb])[b["unit"]], torch.cat([e.R for e in mb])
                ratio = (logp - old_logp).exp()
                pg = torch.max(-A * ratio, -A * ratio.clamp(1 - c.cliprange, 1 + c.cliprange)).sum()
                V_clip = old_V + (V - old_V).clamp(-c.cliprange_value, c.cliprange_value)
                vf = (0.5 * torch.max((V - R) ** 2, (V_clip - R) ** 2)).sum()
                ((pg - c.ent_coef * torch.zeros(())) / N + c.vf_coef * vf / U).backward()
            torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
            opt.step()


def test_the_single_process_update_is_bit_for_bit_the_frozen_formula_and_dist_one_is_the_same(make_policy):
    g = torch.Generator().manual_seed(4)
    eps = [random_episode(g, 5 + 3 * i, [(3 + i, 4)] * (1 + i % 3), [0.3 * i - 0.5] * (1 + i % 3)) for i in range(5)]
    c = cfg(batch_size=5, mini_batch_size=2, grad_accum=2, ppo_epochs=2, init_kl_coef=0.1)  # groups of 4 and 1
    start = make_policy(seed=2)
    randomize_lora(start)
    after = []
    for run in ("frozen", "ppo", "dist.ONE"):
        pol = copy.deepcopy(start)
        opt, gen = ppo.make_optimizer(pol, c), torch.Generator().manual_seed(9)
        batch = [rollout.Episode(e.ids, e.act, e.step, e.state_end, e.rewards) for e in eps]
        if run == "frozen":
            frozen_update(pol, opt, batch, c, c.init_kl_coef, gen)
        else:
            (ppo.update if run == "ppo" else dist.ONE.update)(pol, opt, batch, c, ppo.KLController(c), gen)
        after.append(weights(pol))
    assert any(not torch.equal(v, after[0][k]) for k, v in start.state_dict().items())   # the weights moved
    for other in after[1:]:
        assert all(torch.equal(after[0][k], other[k]) for k in after[0])


def action_logp(pol, ep):
    pol.eval()
    with torch.no_grad():
        c = ppo.collate([ep], "step", pol.device)
        return pol(c["ids"], c["mask"], c["act_idx"], c["act_tok"], c["v_idx"])[0].sum().item()


@pytest.mark.parametrize("r", [1.0, -1.0])
def test_an_action_with_positive_advantage_gains_log_prob_and_negative_loses_it(make_policy, r):
    pol = make_policy()
    g = torch.Generator().manual_seed(1)
    ep = random_episode(g, 10, [(4, 0)], [r])  # one step: A = r - V(s_0), |V| << 1
    c = cfg(whiten=False, vf_coef=0.01, ppo_epochs=2, batch_size=1, mini_batch_size=1)
    opt, ctl = ppo.make_optimizer(pol, c), ppo.KLController(c)
    before = action_logp(pol, ep)
    for _ in range(3):
        ppo.update(pol, opt, [ep], c, ctl)
        assert (r * ep.A > 0).all()  # the advantage keeps the reward's sign while V learns
    assert r * (action_logp(pol, ep) - before) > 0.3  # about 1 nat in practice


def weights(pol):
    return {k: v.detach().clone() for k, v in pol.state_dict().items()}


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_nan_skips_the_update_counts_it_and_leaves_weights_bit_identical(make_policy, where):
    pol = make_policy()
    eps = two_episodes()
    if where == "loss":
        eps[1].rewards[0] = float("nan")  # -> NaN advantages -> NaN loss
    else:
        pol.v_head.weight.register_hook(lambda grad: grad * float("nan"))  # finite loss, NaN gradient
    c = cfg(ppo_epochs=3, mini_batch_size=1, grad_accum=1)  # 2 optimizer steps per epoch
    opt = ppo.make_optimizer(pol, c)
    before = weights(pol)
    stats = ppo.update(pol, opt, eps, c, ppo.KLController(c))
    assert stats["ppo/skipped_updates"] == 6
    after = weights(pol)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not opt.state  # Adam never stepped


def test_a_finite_update_counts_no_skips_and_changes_the_lora_weights(make_policy):
    pol = make_policy()
    before = weights(pol)
    stats = ppo.update(pol, ppo.make_optimizer(pol, cfg()), two_episodes(), cfg(), ppo.KLController(cfg()))
    after = weights(pol)
    assert stats["ppo/skipped_updates"] == 0
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith((".A", ".B")) or k.startswith("v_head.") for k in changed)


def test_a_bf16_model_trains_fp32_adapters_and_value_head_and_its_base_stays_frozen(tiny_tok):
    model, tok = models.build_tiny(0, tok=tiny_tok, **SMALL)
    model.to(torch.bfloat16).requires_grad_(False)
    P.inject_lora(model, 4, 8, 0.0)
    pol = P.Policy(model, tok, "tiny", dict(r=4, alpha=8, dropout=0.0, targets=list(P.LORA_TARGETS)))
    trainable = {n: p for n, p in pol.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    before = {k: v.clone() for k, v in pol.state_dict().items()}
    stats = ppo.update(pol, ppo.make_optimizer(pol, cfg()), two_episodes(), cfg(), ppo.KLController(cfg()))
    assert stats["ppo/skipped_updates"] == 0
    changed = {k for k, v in pol.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.endswith((".A", ".B")) or k.startswith("v_head.") for k in changed)


# ---- fixed trajectories (the original's TSV) ----------------------------------------------------
TSV = os.path.join(FIXTURES, "reward_steptool.tsv")


def test_episodes_from_tsv_rows_have_one_step_per_response_with_its_reward_and_tokens(make_policy):
    pol = make_policy()
    rows = formats.read_tsv(TSV)
    eps, dropped = offline.episodes_from_rows(pol, rows)
    assert dropped == 0 and len(eps) == len(rows)
    enc = lambda s: pol.tok(s, add_special_tokens=False)["input_ids"]
    for ep, row in zip(eps, rows):
        assert ep.n_steps == len(row["response"]) and ep.rewards == row["reward"]
        assert ep.ids == sum((enc(p) + enc(r) for p, r in zip(row["prompt"], row["response"])), [])
        for t, text in enumerate(row["response"]):
            assert [i for i, s in zip(ep.ids, ep.step) if s == t] == enc(text)
            assert ep.act[ep.state_end[t] + 1] and not ep.act[ep.state_end[t]]  # s_t ends right before a_t
        assert sum(ep.act) == sum(len(enc(r)) for r in row["response"])


def test_truncate_left_drops_steps_whose_action_is_cut_with_their_rewards_and_reports_them(make_policy):
    pol = make_policy()
    rows = formats.read_tsv(TSV)[:1]
    (full,), _ = offline.episodes_from_rows(pol, rows)
    first_action = full.state_end[0] + 1
    n = len(full.ids) - first_action - 2  # cuts into the first action
    (ep,), dropped = offline.episodes_from_rows(pol, rows, max_tokens=n)
    assert dropped == 1 and len(ep.ids) == n and ep.ids == full.ids[-n:]
    assert ep.n_steps == full.n_steps - 1 and ep.rewards == rows[0]["reward"][1:]
    cut = len(full.ids) - n
    for t in range(ep.n_steps):  # kept steps: same tokens, same state ends, renumbered from 0
        assert [p + cut for p, s in enumerate(ep.step) if s == t] == [p for p, s in enumerate(full.step) if s == t + 1]
        assert ep.state_end[t] + cut == full.state_end[t + 1]
    assert not any(ep.act[:full.state_end[1] + 1 - cut])  # the rest of the cut action is context now
    ppo.units(ep, "step")  # and the episode is well formed for the update


@pytest.mark.parametrize("n,kept", [(3, 1),   # [4 | 5 6]: s_0 ends at 4, a_0 whole: kept
                                     (2, 0),   # [5 6]: a_0 whole but no token of s_0 left to read V(s_0) at
                                     (1, 0)])  # [6]: a_0 cut
def test_truncate_left_keeps_a_step_only_with_its_whole_action_and_the_last_token_of_its_state(n, kept):
    ep = episode(("c", [1, 2, 3, 4]), ("a", [5, 6]), rewards=[1.0])
    new, dropped = offline.truncate_left(ep, n)
    assert new.ids == [4, 5, 6][-n:] and dropped == 1 - kept and new.rewards == [1.0] * kept
    assert new.act == ([False, True, True] if kept else [False] * n) and new.state_end == [0] * kept


# ---- rollouts against the embedded tool server --------------------------------------------------
KW = dict(max_steps=2, max_new_tokens=16)


@pytest.fixture(scope="module")
def rollout_policy(tiny_tok):
    import policy as P
    model, tok = models.build_tiny(3, tok=tiny_tok, **SMALL)
    model.config.use_cache = False
    torch.manual_seed(3)
    return P.Policy(model, tok, "tiny")


def test_rollout_episodes_match_their_trajectories_step_for_step(rollout_policy, tool_server, test_tasks):
    pol, client = rollout_policy, toolclient.ToolClient(tool_server.url)
    eps, trajs = rollout.rollout(pol, test_tasks[:3], client, **KW)
    assert [t.query_id for t in trajs] == [t.query_id for t in test_tasks[:3]]
    for ep, traj, task in zip(eps, trajs, test_tasks):
        assert ep.n_steps == len(traj.steps) == 2 and traj.end == "max_steps"
        assert ep.ids[:ep.state_end[0] + 1] == pol.encode_prompt(env.initial_messages(task))
        for t, step in enumerate(traj.steps):
            act = [i for i, s in zip(ep.ids, ep.step) if s == t]
            assert 1 <= len(act) <= KW["max_new_tokens"]
            assert pol.decode_action(act) == step.text  # what the environment saw
        a0_end = max(p for p, s in enumerate(ep.step) if s == 0)
        obs = ep.ids[a0_end + 1:ep.state_end[1] + 1]
        assert traj.steps[0].observation in pol.tok.decode(obs)  # the observation sits between the actions
        if ep.ids[a0_end] != pol.eot_id:  # cut at max_new_tokens: the template's end of turn follows as context
            assert obs[0] == pol.eot_id
        else:
            assert obs[0] != pol.eot_id
        assert not any(ep.act[p] for p in range(len(ep.ids)) if ep.step[p] < 0)


def test_rollout_ends_at_max_context_keeping_completed_steps(rollout_policy, tool_server, test_tasks):
    pol, client = rollout_policy, toolclient.ToolClient(tool_server.url)
    n_prompt = len(pol.encode_prompt(env.initial_messages(test_tasks[0])))
    eps, trajs = rollout.rollout(pol, test_tasks[:1], client, max_context=n_prompt + 16 + 5, **KW)
    assert trajs[0].end == "max_context" and eps[0].n_steps == len(trajs[0].steps) == 1
    assert len(eps[0].ids) > n_prompt + 5  # step 1 and its observation kept


def test_rollout_is_a_function_of_seed_and_episode_index_not_of_the_batch(rollout_policy, tool_server, test_tasks):
    pol, client = rollout_policy, toolclient.ToolClient(tool_server.url)
    batch, _ = rollout.rollout(pol, test_tasks[:3], client, seed=7, **KW)
    again, _ = rollout.rollout(pol, test_tasks[:3], client, seed=7, **KW)
    alone, _ = rollout.rollout(pol, test_tasks[1:2], client, seed=7, first_episode=1, **KW)
    other, _ = rollout.rollout(pol, test_tasks[:3], client, seed=8, **KW)
    assert [e.ids for e in batch] == [e.ids for e in again]
    assert alone[0].ids == batch[1].ids and alone[0].act == batch[1].act
    assert [e.ids for e in other] != [e.ids for e in batch]
    same, _ = rollout.rollout(pol, [test_tasks[0]] * 3, client, seed=7, **KW)
    assert same[0].ids == batch[0].ids and len({tuple(e.ids) for e in same}) == 3  # one generator per episode


def test_a_bounded_batch_refills_as_episodes_end_and_samples_the_same_episodes(rollout_policy, tool_server, test_tasks,
                                                                                 monkeypatch):
    pol, client = rollout_policy, toolclient.ToolClient(tool_server.url)
    tasks = test_tasks[:5]
    whole, _ = rollout.rollout(pol, tasks, client, seed=7, **{**KW, "max_steps": 3})
    slots, done, forward = [], [], rollout._forward
    def spy(policy, kv, rows, *a, **k):
        slots.append((kv.S, rows[-1] + 1))
        return forward(policy, kv, rows, *a, **k)
    monkeypatch.setattr(rollout, "_forward", spy)
    bounded, trajs = rollout.rollout(pol, tasks, client, seed=7, batch_size=2, on_done=done.append, **{**KW, "max_steps": 3})
    assert {s for s, _ in slots} == {2} and max(hi for _, hi in slots) == 2  # never more than 2 live
    assert sum(done) == 5 and [t.query_id for t in trajs] == [t.query_id for t in tasks]
    assert [e.ids for e in bounded] == [e.ids for e in whole] and [e.act for e in bounded] == [e.act for e in whole]


def test_a_turn_ended_by_an_eos_that_is_not_the_end_of_turn_gets_the_templates_end_of_turn(
        rollout_policy, tiny_tok, tool_server, test_tasks, monkeypatch):
    import copy
    import itertools
    import policy as P
    tok = copy.deepcopy(tiny_tok)
    tok.eos_token = "<|endoftext|>"  # as a base model: eos ends generation, <|im_end|> ends a turn
    pol = P.Policy(rollout_policy.model, tok, "tiny")
    assert pol.stop_ids == sorted([pol.eot_id, tok.eos_token_id]) and tok.eos_token_id != pol.eot_id
    turn = tok("Thought: hm\nAction: nothing_here", add_special_tokens=False)["input_ids"]
    seq = itertools.cycle(turn + [tok.eos_token_id])    # every turn samples exactly this
    monkeypatch.setattr(rollout, "_sample", lambda logits, *a: torch.tensor([next(seq)] * len(logits)))
    (ep,), (traj,) = rollout.rollout(pol, test_tasks[:1], toolclient.ToolClient(tool_server.url), **KW)
    a0_end = max(p for p, s in enumerate(ep.step) if s == 0)
    assert traj.steps[0].text == "Thought: hm\nAction: nothing_here"
    assert ep.ids[a0_end] == tok.eos_token_id and ep.ids[a0_end + 1] == pol.eot_id and not ep.act[a0_end + 1]


def test_a_batch_without_steps_is_an_update_that_changes_nothing(make_policy):
    pol = make_policy()
    before = weights(pol)
    stats = ppo.update(pol, ppo.make_optimizer(pol, cfg()), [episode(("c", [5, 6, 7]))], cfg(), ppo.KLController(cfg()))
    assert stats["ppo/episodes"] == 0 and stats["ppo/skipped_updates"] == 0
    assert all(torch.equal(v, weights(pol)[k]) for k, v in before.items())
