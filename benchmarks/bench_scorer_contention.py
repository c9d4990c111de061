"""Scorer latency while another Python thread holds the GIL, as the reward server's event loop does
when many requests arrive: eager versus traced conv reward model, and the tiny VLM judge, at Python's
default GIL switch interval (5 ms) and at the reward server's (actors/reward_server.py).

Each scorer runs on a worker thread, as the reward server runs it; the main thread either idles or
spins in pure Python. Printed side by side from one run:

    python benchmarks/bench_scorer_contention.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from actors.reward_server import GIL_SWITCH_INTERVAL_S, probe_samples
from posterrl.config import load_config
from posterrl.models.reward_model import build_reward_model, reward_model_spec, save_reward_model
from posterrl.models.tiny_vlm import build_tiny_qwen2_vl
from reward_server.bradley_terry import BradleyTerryScorer
from reward_server.judge import VlmJudge


class EagerScorer:
    """The same conv model as BradleyTerryScorer serves, called op by op from Python."""

    def __init__(self, scorer: BradleyTerryScorer):
        self.model = scorer.model

    @torch.no_grad()
    def score(self, samples):
        return self.model(**self.model.prepare(samples))


def median_ms(scorer, samples, repeats: int, busy: bool) -> float:
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1

    spinner = threading.Thread(target=spin)
    if busy:
        spinner.start()
    times = []
    with ThreadPoolExecutor(1) as worker:
        worker.submit(scorer.score, samples).result()  # warm-up
        for _ in range(repeats):
            began = time.perf_counter()
            worker.submit(scorer.score, samples).result()
            times.append(time.perf_counter() - began)
    stop.set()
    if busy:
        spinner.join()
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the reward server's share in the tiny default (reward.cpus < 1)
    config = load_config("configs/tiny.yaml", [])
    root = Path(tempfile.mkdtemp(prefix="bench_contention_"))
    save_reward_model(build_reward_model(reward_model_spec(config.reward_model)), root / "rm")
    traced = BradleyTerryScorer(root / "rm")
    scorers = {"BT conv, eager": EagerScorer(traced), "BT conv, traced (served)": traced,
               "VLM judge (tiny Qwen2-VL)": VlmJudge("transformers", str(build_tiny_qwen2_vl(root / "vlm")))}
    samples = probe_samples(config, 16)

    print(f"\nmedian ms per score() call on a worker thread, {args.repeats} calls each, 1 torch thread")
    header = f"{'scorer':<28}{'batch':>6}{'idle':>9}"
    intervals = {"busy, 5 ms": 0.005, f"busy, {GIL_SWITCH_INTERVAL_S * 1000:g} ms": GIL_SWITCH_INTERVAL_S}
    print(header + "".join(f"{name:>15}" for name in intervals))
    for name, scorer in scorers.items():
        for batch in (1, 16):
            row = [median_ms(scorer, samples[:batch], args.repeats, busy=False)]
            for interval in intervals.values():
                sys.setswitchinterval(interval)
                row.append(median_ms(scorer, samples[:batch], args.repeats, busy=True))
            sys.setswitchinterval(0.005)
            print(f"{name:<28}{batch:>6}{row[0]:>9.1f}" + "".join(f"{v:>15.1f}" for v in row[1:])
                  + f"   slowdown {row[1] / row[0]:.0f}x -> {row[2] / row[0]:.1f}x")


if __name__ == "__main__":
    main()
