"""Fixed trajectories (the original StepTool's TSV of prompt / response / reward rows) as Episodes.

`episodes_from_rows` turns the rows `formats.read_tsv` reads into rollout.Episodes with step rewards,
ready for ppo.update (`steptool.py --data`, the paper's offline mode) or SFT (sft.py);
`truncate_left` cuts an episode to its last n tokens, keeping only the steps whose action and value
position survive the cut.
"""
import rollout


def episodes_from_rows(policy, rows, max_tokens=None):
    """TSV rows {prompt, response, reward} (formats.read_tsv) -> Episodes with step rewards.

    prompt[0] is the state before the first action; prompt[k] is the observation after action k-1.
    With max_tokens, each trajectory keeps its last max_tokens tokens; a step whose action (or the
    state token before it) is cut is dropped with its reward, and counted in the second return value.
    """
    eps, dropped = [], 0
    for row in rows:
        ep = rollout.Episode()
        for p, r in zip(row["prompt"], row["response"]):
            ep.add_context(policy.tok(p, add_special_tokens=False)["input_ids"])
            ep.add_action(policy.tok(r, add_special_tokens=False)["input_ids"])
        ep.rewards = list(row["reward"])
        if max_tokens and len(ep.ids) > max_tokens:
            ep, d = truncate_left(ep, max_tokens)
            dropped += d
        eps.append(ep)
    return eps, dropped


def truncate_left(ep, n):
    """Keep the last n tokens. A step survives only with its whole action and the last token of its
    state (where V(s_t) is read); the others lose their gradient and reward."""
    cut = len(ep.ids) - n
    keep = [t for t in range(ep.n_steps) if ep.state_end[t] >= cut]
    new = rollout.Episode(ids=ep.ids[cut:], act=[], step=[], state_end=[], rewards=[ep.rewards[t] for t in keep])
    remap = {t: i for i, t in enumerate(keep)}
    for p in range(cut, len(ep.ids)):
        s = ep.step[p] if ep.act[p] and ep.step[p] in remap else -1
        new.act.append(s >= 0); new.step.append(remap.get(s, -1) if s >= 0 else -1)
    new.state_end = [ep.state_end[t] - cut for t in keep]
    return new, ep.n_steps - len(keep)
