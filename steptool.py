"""StepTool entry point. For now: start the embedded tool server and replay the embedded
benchmark's expert trajectories through env, printing how many solve their task.
(The training loop arrives with the PPO issues.)

    python steptool.py [--tasks data/bench_test.json]
"""
import argparse
import os

import env
import server

HERE = os.path.dirname(os.path.abspath(__file__))


def replay_experts(tasks, client):
    """Replay each task's expert trajectory through the environment; count those that solve it."""
    solved = 0
    for task in tasks:
        e = env.ToolEnv(client)
        e.reset(task)
        for s in task.expert:
            if e.done:
                break
            e.step(env.format_action(s["thought"], s["name"], s["arguments"]))
        answer = e.traj.final_answer.lower()
        solved += e.traj.finish == "give_answer" and all(a.lower() in answer for a in task.answer)
    return solved


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=os.path.join(HERE, "data", "bench_test.json"))
    a = ap.parse_args()
    srv = server.start_in_thread()
    try:
        client = env.ToolClient(srv.url)
        client.check()
        tasks = env.load_tasks(a.tasks)
        n = replay_experts(tasks, client)
        print(f"expert trajectories: {n}/{len(tasks)} solve their task (server {srv.url})")
    finally:
        srv.shutdown()
