"""Tiny policy speed, measured side by side in one run.

Prints: forward+backward samples/s, sampler images/s, and the sampler's overhead over calling
the bare diffusers transformer the same number of times on the same tensors (target: < 10%).

    python benchmarks/bench_policy.py [--config configs/tiny.yaml] [--batch 8] [--steps 8] [--repeats 5] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from posterrl.config import load_config
from posterrl.flow import SamplerConfig, flow_sigmas
from posterrl.policy import EditPolicy
from rollout.sampler import group_noise, sample


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=1, help="input images per sample")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(args.config, args.overrides)
    policy = EditPolicy.from_config(config.model)
    r, b = policy.spec.resolution, args.batch
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(b, 3, r, r, generator=g)
    t = torch.rand(b, generator=g)
    refs = torch.rand(b, args.inputs, 3, r, r, generator=g) * 2 - 1
    ids, mask = policy.tokenize(["Fill the masked region of this poster with what belongs there."] * b)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = (policy(x_t, t, ids, mask, refs) - torch.randn_like(x_t)).pow(2).mean()
        loss.backward()
        optimizer.step()

    policy.train()
    train_s = timed(train_step, args.repeats)

    policy.eval()
    sampler = SamplerConfig("euler", args.steps, config.rollout.shift)
    noise = group_noise([0], b, (3, r, r))
    with torch.no_grad():
        cond = policy.encode_condition(ids, mask, refs)
    sigmas = flow_sigmas(args.steps, config.rollout.shift)

    def full_sampler():
        with torch.no_grad():
            sample(policy, policy.encode_condition(ids, mask, refs), noise, sampler)

    # The floor: the bare transformer on already-packed tokens, once per step, nothing else.
    hidden = torch.cat([policy.pack(noise), cond.ref_tokens], dim=1)
    img_ids = torch.cat([policy.noisy_ids, cond.ref_ids])

    def bare_transformer():
        with torch.no_grad():
            for sigma in sigmas[:-1]:
                policy.transformer(hidden_states=hidden, encoder_hidden_states=cond.text,
                                   pooled_projections=cond.pooled, timestep=sigma.expand(b), img_ids=img_ids,
                                   txt_ids=policy.txt_ids, return_dict=False)

    sampler_times, bare_times = [], []
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits both alike
        sampler_times.append(timed(full_sampler, 1))
        bare_times.append(timed(bare_transformer, 1))
    sampler_s, bare_s = statistics.median(sampler_times), statistics.median(bare_times)

    print(f"tiny policy: {policy.num_parameters() / 1e6:.2f}M parameters, canvas {r}px, "
          f"{policy.spec.tokens_per_image} tokens/image, {args.inputs} input image(s), batch {b}, "
          f"{args.threads} threads")
    print(f"{'measure':<46}{'value':>12}")
    print(f"{'forward+backward+AdamW samples/s':<46}{b / train_s:>12.1f}")
    print(f"{'sampler images/s (' + str(args.steps) + ' Euler steps)':<46}{b / sampler_s:>12.2f}")
    print(f"{'bare transformer, same steps, images/s':<46}{b / bare_s:>12.2f}")
    overhead = sampler_s / bare_s - 1
    print(f"{'sampler overhead over bare transformer':<46}{overhead * 100:>11.1f}%  (target < 10%: "
          f"{'met' if overhead < 0.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
