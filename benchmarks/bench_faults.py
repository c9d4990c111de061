"""Fault soak: the tiny rl stage with rollout actors and the reward server SIGKILLed at seeded random times,
and one learner rank killed and the run resumed, against the same run without faults.

    python benchmarks/bench_faults.py [--epochs 24] [--rollout-kills 20] [--server-kills 3] [--seed 0]

It prints the epochs completed, the faults injected per kind, the samples lost and duplicated (from the
rollout dumps: every epoch's sample ids against the unharmed run's), the recovery time per fault (kill
until Ray runs the actor in a new process; a lost chunk from the driver noticing until it is sampled
again), the learner kill's time to a clean stop, and the final held-out gold of both runs. Both runs
share the 2 cores in turn, never at once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posterrl.config import load_config  # noqa: E402
from posterrl.models.reward_model import build_reward_model, reward_model_spec, save_reward_model  # noqa: E402
from posterrl.policy import EditPolicy  # noqa: E402

BASE = ["data.n_train=2", "data.n_val=1", "data.chunks=2", "rollout.eval_per_task=1", "rollout.num_steps=2",
        "rollout.group_size=2", "learner.micro_batch_size=2", "logging.progress=false", "rl.prompts_per_epoch=6",
        "rl.batch_size=4", "rl.dump_every=1", "rl.log_images_every=100", "rl.eval_every=1000",
        "rl.checkpoint_every=2", "learner.num_ranks=2", "stages=[data,rl,eval]"]


def session_processes(session: int, title: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and " ".join(process.cmdline()).startswith(title):
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


class Soak:
    def __init__(self, args: argparse.Namespace, root: Path):
        self.args, self.root = args, root
        self.rng = random.Random(args.seed)
        self.kills: list[dict] = []  # {"kind", "time", "pid", "epoch_dumps"}
        self.fault_records: list[dict] = []  # the driver's fault events, over both attempts
        rm = root / "rm"
        config = load_config("configs/tiny.yaml", BASE)
        save_reward_model(build_reward_model({**reward_model_spec(config.reward_model), "seed": 0}), rm)
        self.overrides = [*BASE, f"rl.epochs={args.epochs}",
                          f"reward.scorers=[{{name: bt, kind: bradley_terry, path: {rm}}}, "
                          "{name: keep, kind: preservation, weight: 0.5}]"]
        self.policy = EditPolicy.from_config(config.model, config.rollout)

    def start(self, run: Path, resume: bool = False) -> subprocess.Popen:
        if not (run / "checkpoints" / "distill").exists():
            self.policy.save_pretrained(run / "checkpoints" / "distill")
        log = (run.parent / f"{run.name}{'_resume' if resume else ''}.log").open("w")
        return subprocess.Popen([sys.executable, "-m", "posterrl.cli", "run", "configs/tiny.yaml", *self.overrides,
                                 "--run-dir", str(run), *(["--resume"] if resume else [])],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)

    def dumps(self, run: Path) -> int:
        return len(list((run / "rollouts").glob("epoch_*/rollouts.jsonl")))

    def kill(self, proc: subprocess.Popen, run: Path, kind: str, title: str) -> bool:
        """SIGKILL one process titled `title`; for actors Ray restarts, wait until a new one is up (timed)."""
        victims = session_processes(proc.pid, title)
        if not victims:
            return False
        before = {p.pid for p in victims}
        victim = self.rng.choice(victims)
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            return False
        kill = {"kind": kind, "time": time.time(), "pid": victim.pid, "epoch_dumps": self.dumps(run)}
        self.kills.append(kill)
        if kind != "learner":  # Ray restarts it: timed on the side, so the next kills keep their schedule
            threading.Thread(target=self.time_restart, args=(proc, title, before, kill), daemon=True).start()
        return True

    def time_restart(self, proc: subprocess.Popen, title: str, before: set[int], kill: dict) -> None:
        """Until a process of the killed actor's class that was not there before the kill runs."""
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if [p for p in session_processes(proc.pid, title) if p.pid not in before]:
                kill["new_process_s"] = time.time() - kill["time"]
                return
            time.sleep(0.05)

    def collect_faults(self, run: Path) -> None:
        summary = json.loads((run / "summary.json").read_text())
        self.fault_records += summary.get("faults", {}).get("events", [])

    def faulty(self, run: Path) -> float:
        """The faulty run: kills until the targets are met; one learner kill half-way, then --resume."""
        args = self.args
        server_at = set(self.rng.sample(range(2, args.rollout_kills), args.server_kills))  # after these rollout kills
        learner_epoch = args.epochs // 2
        began = time.time()
        proc, learner_killed, rollout_kills = self.start(run), False, 0
        while proc.poll() is None or not learner_killed:
            if proc.poll() is not None:  # the learner kill stopped it: resume
                assert proc.returncode == 1, f"the run exited {proc.returncode} after the learner kill"
                self.collect_faults(run)
                proc = self.start(run, resume=True)
                learner_killed = True
                continue
            dumps = self.dumps(run)
            if dumps == 0 or dumps >= args.epochs:  # only in the rl stage
                time.sleep(0.2)
                continue
            if not learner_killed and dumps >= learner_epoch:
                if self.kill(proc, run, "learner", "ray::Learner"):
                    proc.wait(timeout=600)  # the driver notices, checkpoints nothing new, and exits
                    self.kills[-1]["noticed_s"] = time.time() - self.kills[-1]["time"]
                continue
            if rollout_kills < args.rollout_kills:
                time.sleep(self.rng.uniform(0.5, 2 * args.kill_every - 0.5))
                if proc.poll() is None and self.kill(proc, run, "rollout_actor", "ray::RolloutActor"):
                    rollout_kills += 1
                    if rollout_kills in server_at:
                        self.kill(proc, run, "reward_server", "ray::RewardServer")
            else:
                time.sleep(0.2)
        proc.wait()
        assert proc.returncode == 0, f"the resumed run exited {proc.returncode}: see {run.parent}/*.log"
        self.collect_faults(run)
        return time.time() - began

    def recovery(self) -> dict[str, list[float]]:
        """Seconds per fault: from each kill until Ray had the actor running in a new process, and (the
        driver's events) from noticing a lost chunk until it was sampled again."""
        times: dict[str, list[float]] = {
            "rollout_actor": [k["new_process_s"] for k in self.kills if k["kind"] == "rollout_actor"
                              and "new_process_s" in k],
            "reward_server": [k["new_process_s"] for k in self.kills if k["kind"] == "reward_server"
                              and "new_process_s" in k],
            "lost chunk re-sampled": [e["recovered_at"] - e["detected_at"] for e in self.fault_records
                                      if e["kind"] == "rollout_chunks_redispatched" and e["recovered_at"]],
        }
        return times


def sample_ids(run: Path) -> dict[int, list[str]]:
    ids = {}
    for path in sorted((run / "rollouts").glob("epoch_*/rollouts.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        ids[int(path.parent.name.split("_")[1])] = [row["sample_id"] for row in rows]
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--rollout-kills", type=int, default=20)
    parser.add_argument("--server-kills", type=int, default=3)
    parser.add_argument("--kill-every", type=float, default=2.5, help="mean seconds between rollout-actor kills")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_faults_"))
    root.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, root)

    faulty_s = soak.faulty(root / "faulty")
    began = time.time()
    clean = soak.start(root / "clean")
    assert clean.wait() == 0, f"the unharmed run failed: see {root}/clean.log"
    clean_s = time.time() - began

    faulty_ids, clean_ids = sample_ids(root / "faulty"), sample_ids(root / "clean")
    lost = sum(len(set(clean_ids[e]) - set(faulty_ids.get(e, []))) for e in clean_ids)
    duplicated = sum(len(ids) - len(set(ids)) for ids in faulty_ids.values())
    foreign = sum(len(set(faulty_ids[e]) - set(clean_ids.get(e, []))) for e in faulty_ids)
    gold = {name: json.loads((root / name / "summary.json").read_text())["stages"]["eval"]["gold"]["mean"]
            for name in ("faulty", "clean")}
    injected = {kind: sum(1 for k in soak.kills if k["kind"] == kind)
                for kind in ("rollout_actor", "reward_server", "learner")}
    counted: dict[str, int] = {}
    for event in soak.fault_records:
        counted[event["kind"]] = counted.get(event["kind"], 0) + 1

    print(f"epochs completed: {len(faulty_ids)} of {args.epochs} (unharmed run: {len(clean_ids)})")
    print("faults injected: " + ", ".join(f"{kind} {n}" for kind, n in injected.items()))
    print("faults the driver counted: " + ", ".join(f"{kind} {n}" for kind, n in sorted(counted.items())))
    print(f"samples lost: {lost}   duplicated: {duplicated}   not in the unharmed run: {foreign}   "
          f"(of {sum(len(v) for v in clean_ids.values())})")
    print("| recovery | injected | timed | median s | max s |")
    print("|---|---|---|---|---|")
    for kind, times in soak.recovery().items():
        median = f"{statistics.median(times):.2f}" if times else "-"
        worst = f"{max(times):.2f}" if times else "-"
        print(f"| {kind} | {injected.get(kind, '-')} | {len(times)} | {median} | {worst} |")
    learner = next(k for k in soak.kills if k["kind"] == "learner")
    print(f"learner rank killed after {learner['epoch_dumps']} epoch dumps: the run stopped "
          f"{learner['noticed_s']:.1f} s later (exit 1) and was resumed")
    print(f"final held-out gold: faulty {gold['faulty']:.4f}, unharmed {gold['clean']:.4f}, "
          f"difference {abs(gold['faulty'] - gold['clean']):.4f}")
    print(f"wall clock: faulty run (both attempts) {faulty_s:.0f} s, unharmed run {clean_s:.0f} s; runs in {root}")


if __name__ == "__main__":
    main()
