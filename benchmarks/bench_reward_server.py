"""Reward-server throughput: dynamic batching versus one request at a time, 32 concurrent clients.

Both servers are real named Ray actors serving the same Bradley-Terry reward model (the tiny
default's conv backbone, or --channels/--image-size for a larger one); each client sends requests
of --per-request samples (default 1) back to back. A third server that answers without scoring
shows the ceiling the Ray round trips and the clients themselves put on throughput here. Printed
side by side from one run:

    python benchmarks/bench_reward_server.py [--clients 32] [--seconds 20] [--per-request 1]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray

from actors.cluster import new_run_token
from actors.reward_server import probe_samples, start_reward_server
from posterrl.config import load_config
from posterrl.models.reward_model import build_reward_model, reward_model_spec, save_reward_model
from posterrl.runlog import RunDir


@ray.remote(num_cpus=1, max_concurrency=1000)
class EchoServer:
    """Answers a request without scoring it: what the same clients reach when the server does no work, i.e.
    the ceiling that Ray round trips and the clients themselves put on any server on this machine."""

    async def score(self, samples, step=None):
        return [None] * len(samples)

    async def describe(self):
        return {"stats": {"mean_batch_size": float("nan")}}


def drive(server, samples, clients: int, seconds: float, per_request: int = 1) -> dict[str, float]:
    latencies: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(index: int) -> None:
        request = [samples[(index + k) % len(samples)] for k in range(per_request)]
        while not stop.is_set():
            began = time.perf_counter()
            ray.get(server.score.remote(request))
            with lock:
                latencies.append(time.perf_counter() - began)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    described = ray.get(server.describe.remote())
    return {"samples_per_s": len(latencies) * per_request / elapsed,
            "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "mean_batch": described["stats"]["mean_batch_size"], "requests": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--per-request", type=int, default=1,
                        help="samples per request (a rollout actor sends a prompt group of K at once)")
    parser.add_argument("--channels", type=int, help="conv backbone width (default: the tiny default's)")
    parser.add_argument("--image-size", type=int, help="conv backbone canvas (default: the tiny default's)")
    args = parser.parse_args()

    overrides = [f"reward_model.channels={args.channels}"] if args.channels else []
    overrides += [f"reward_model.image_size={args.image_size}"] if args.image_size else []
    base = load_config("configs/tiny.yaml", overrides)
    root = Path(tempfile.mkdtemp(prefix="bench_reward_"))
    new_run_token(root)  # token auth with a token of its own, as a run's cluster
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    model_dir = root / "rm"
    save_reward_model(build_reward_model(reward_model_spec(base.reward_model)), model_dir)
    samples = probe_samples(base, 16)

    modes = {"one at a time": ["reward.max_batch_size=1", "reward.max_wait_ms=0"],
             "dynamic batching": [f"reward.max_batch_size={args.clients * args.per_request}", "reward.max_wait_ms=5"]}
    results = {}
    for mode, extra in modes.items():
        scorer = f"reward.scorers=[{{name: bt, kind: bradley_terry, path: {model_dir}}}]"
        config = load_config("configs/tiny.yaml", [*overrides, "stages=[data]", "reward.cpus=1", *extra, scorer])
        run = RunDir(root / mode.replace(" ", "_")).create(config)
        server = start_reward_server(config, run)
        drive(server, samples, args.clients, 2.0, args.per_request)  # warm-up: threads, allocator, first batches
        results[mode] = drive(server, samples, args.clients, args.seconds, args.per_request)
        ray.kill(server, no_restart=True)

    echo = EchoServer.remote()
    drive(echo, samples, args.clients, 2.0, args.per_request)
    results["no scoring (ceiling)"] = drive(echo, samples, args.clients, args.seconds, args.per_request)
    ray.kill(echo, no_restart=True)

    print(f"\nreward server, {args.clients} concurrent clients, {args.per_request}-sample requests, "
          f"{args.seconds:g} s each, "
          f"BT conv backbone (channels {base.reward_model.channels}, canvas {base.reward_model.image_size})")
    print(f"{'mode':<22}{'samples/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'mean batch':>12}")
    for mode, r in results.items():
        print(f"{mode:<22}{r['samples_per_s']:>12.1f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['mean_batch']:>12.1f}")
    ratio = results["dynamic batching"]["samples_per_s"] / results["one at a time"]["samples_per_s"]
    print(f"throughput ratio (dynamic / one at a time): {ratio:.2f}x (target >= 3x)")
    ceiling = results["no scoring (ceiling)"]["samples_per_s"] / results["one at a time"]["samples_per_s"]
    print(f"ceiling ratio (no scoring at all / one at a time): {ceiling:.2f}x: the most any batching could reach "
          "with these clients on this machine")
    ray.shutdown()


if __name__ == "__main__":
    main()
