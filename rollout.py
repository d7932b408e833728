"""Batched multi-turn rollouts: run many tool-use episodes at once (paper Sec. 3 and 4.2).

Each turn, the next assistant turn of every live episode is sampled in one batch (policy.generate,
which keeps each episode's keys and values from turn to turn), the environments step with their
tool calls running concurrently (env.step_all), and each episode's token ids grow by the sampled
action and the observation. An episode ends at Finish, at max_steps, or when its next turn could
not fit in max_context tokens (then it ends unsolved and keeps every completed step; nothing is
dropped silently).

    Episode.ids        [T] prompt, action and observation tokens, in order
    Episode.act        [T] True where the policy sampled the token: the only tokens with gradient
    Episode.step       [T] step index t of each action token, -1 elsewhere
    Episode.state_end  [S] position of the last token of state s_t, where V(s_t) is read

Departures from the original code:
1. The original trains offline only, on fixed trajectories; here rollouts are online and the same
   episodes carry the old log-probs (computed by ppo.prepare) that PPO's ratio needs.
"""
import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

import env


@dataclass
class Episode:
    ids: list = field(default_factory=list)
    act: list = field(default_factory=list)
    step: list = field(default_factory=list)
    state_end: list = field(default_factory=list)
    rewards: list = field(default_factory=list)  # [S] r_t, filled from reward.py

    def add_context(self, tokens):  # prompt or observation: never gets gradient
        self.ids += tokens; self.act += [False] * len(tokens); self.step += [-1] * len(tokens)

    def add_action(self, tokens):   # the action a_t of step t; s_t ends on the token before it
        t = len(self.state_end)
        self.state_end.append(len(self.ids) - 1)
        self.ids += tokens; self.act += [True] * len(tokens); self.step += [t] * len(tokens)

    @property
    def n_steps(self):
        return len(self.state_end)


def episode_generator(seed, iteration, episode):
    """The sampling randomness of one episode: a function of (seed, iteration, episode) only."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, iteration, episode]).generate_state(1)[0]))


def rollout(policy, tasks, client, seed=0, iteration=0, first_episode=0, max_steps=12, max_new_tokens=256,
            max_context=4096, temperature=1.0, top_p=1.0, obs_chars=1024, observation_role=None, batch_size=0,
            on_done=None):
    """Run `tasks` as parallel episodes -> (episodes, trajectories), in task order.
    Tool responses go in the chat template's role for them (policy.obs_role) unless told otherwise.
    batch_size: at most this many episodes at once (0 = all); a finished episode's place goes to the
    next task at the next turn, so a few long episodes do not leave the batch nearly empty.
    on_done(n): called with the number of episodes that ended at each turn (a progress bar)."""
    envs = [env.ToolEnv(client, max_steps, obs_chars, observation_role or policy.obs_role) for _ in tasks]
    eps = [Episode() for _ in tasks]
    gens = [episode_generator(seed, iteration, first_episode + i) for i in range(len(tasks))]
    live, waiting = [], iter(range(len(tasks)))
    caches = [None] * len(tasks)  # each episode's keys and values: a turn computes only its new tokens
    was_training = policy.training
    policy.eval()
    try:
        # fp32 weights: one merged copy of the adapted weights for every turn of the batch (Policy.merged_lora)
        with policy.merged_lora():
            while True:
                for i in itertools.islice(waiting, max(0, (batch_size or len(tasks)) - len(live))):
                    eps[i].add_context(policy.encode_prompt(envs[i].reset(tasks[i])))
                    live.append(i)
                for i in live:
                    if len(eps[i].ids) + max_new_tokens > max_context:
                        envs[i].end("max_context")  # the next turn cannot fit: unsolved, completed steps kept
                live = _still_live(live, envs, on_done)
                if not live:
                    if len(envs) == sum(e.done for e in envs):
                        break
                    continue
                kv = [caches[i] for i in live]
                outs = policy.generate([eps[i].ids for i in live], max_new_tokens, temperature, top_p, [gens[i] for i in live], kv)
                results = env.step_all(client, [envs[i] for i in live], [policy.decode_action(o) for o in outs])
                for i, out, c, (_, done, _) in zip(live, outs, kv, results):
                    eps[i].add_action(out)
                    caches[i] = None if done else c
                    if not done:
                        # a turn that stopped at max_new_tokens, or at an eos that is not the template's end of turn,
                        # gets the template's end-of-turn token as context
                        eps[i].add_context(policy.encode_observation(envs[i].messages, ended=out[-1] == policy.eot_id))
                live = _still_live(live, envs, on_done)
    finally:
        policy.train(was_training)
    return eps, [e.traj for e in envs]


def _still_live(live, envs, on_done):
    out = [i for i in live if not envs[i].done]
    if on_done and len(out) < len(live):
        on_done(len(live) - len(out))
    return out


def expert_episode(policy, task, client):
    """A task's expert trajectory replayed through the server, as an Episode (SFT data)."""
    e, ep = env.ToolEnv(client, observation_role=policy.obs_role), Episode()
    ep.add_context(policy.encode_prompt(e.reset(task)))
    for s in task.expert:
        text = env.format_action(s["thought"], s["name"], s["arguments"])
        _, done, _ = e.step(text)
        ep.add_action(policy.encode_action(text))
        if not done:
            ep.add_context(policy.encode_observation(e.messages, ended=True))
    return ep, e.traj
