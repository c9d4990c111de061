"""Which training rows make up the global batch of each step.

A pure function of (rows, seed, step), so a resumed stage sees exactly the batches the
uninterrupted one would have seen: the data position is the step number.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from posterrl.data.manifest import ManifestRow


class BatchPlan:
    """Global batches of `batch_size` rows that share their number of input images.

    Each step picks a bucket (rows with N inputs) with probability proportional to its size, then
    walks that bucket's per-epoch permutation, so every row is seen once per epoch of its bucket.
    """

    def __init__(self, rows: Sequence[ManifestRow], batch_size: int, seed: int):
        if not rows:
            raise ValueError("BatchPlan needs at least one training row")
        buckets: dict[int, list[ManifestRow]] = defaultdict(list)
        for row in rows:
            buckets[len(row.inputs)].append(row)
        self.buckets = [buckets[n] for n in sorted(buckets)]
        self.batch_size, self.seed = batch_size, seed
        sizes = np.array([len(b) for b in self.buckets], dtype=np.float64)
        self.weights = sizes / sizes.sum()
        self._rng = np.random.default_rng([seed, 0])
        self._bucket: list[int] = []  # bucket index of each step drawn so far
        self._position: list[int] = []  # offset of each step's first row in its bucket's row stream
        self._used = [0] * len(self.buckets)
        self._orders: dict[tuple[int, int], np.ndarray] = {}  # (bucket, epoch) -> permutation

    def _extend_schedule(self, step: int) -> None:
        """Draw bucket choices (one seeded stream, so fixed by the seed) and positions up to `step`.

        Grown once and kept: each step costs O(1) instead of replaying the stream from step 0.
        """
        missing = step + 1 - len(self._bucket)
        if missing <= 0:
            return
        for bucket_index in self._rng.choice(len(self.buckets), size=missing, p=self.weights):
            self._position.append(self._used[bucket_index])  # rows of this bucket used before
            self._used[bucket_index] += self.batch_size
            self._bucket.append(int(bucket_index))

    def _order(self, bucket_index: int, epoch: int) -> np.ndarray:
        key = (bucket_index, epoch)
        if key not in self._orders:
            self._orders[key] = np.random.default_rng([self.seed, 1, bucket_index, epoch]).permutation(
                len(self.buckets[bucket_index]))
        return self._orders[key]

    def batch(self, step: int) -> list[ManifestRow]:
        self._extend_schedule(step)
        bucket_index, position = self._bucket[step], self._position[step]
        bucket = self.buckets[bucket_index]
        out = []
        for k in range(position, position + self.batch_size):
            epoch, offset = divmod(k, len(bucket))
            out.append(bucket[self._order(bucket_index, epoch)[offset]])
        return out


def rl_prompts(rows: Sequence[ManifestRow], n: int, seed: int, epoch: int,
               retired: set[str] | frozenset[str] = frozenset()) -> list[ManifestRow]:
    """The n prompts of an RL epoch: balanced over tasks, a fixed function of (seed, epoch), retired ones left out.

    Tasks take turns (in a per-epoch shuffled order), each drawing its next prompt from its own
    per-epoch permutation, so every task gets n / tasks prompts (+1 for some when n does not divide).
    """
    by_task: dict[str, list[ManifestRow]] = defaultdict(list)
    for row in rows:
        if row.id not in retired:
            by_task[row.task].append(row)
    if not by_task:
        raise ValueError("rl_prompts: no prompt left (every training prompt is retired)")
    rng = np.random.default_rng([seed, 2, epoch])
    tasks = sorted(by_task)
    orders = {t: list(rng.permutation(len(by_task[t]))) for t in tasks}
    turn = [tasks[i] for i in rng.permutation(len(tasks))]
    chosen: list[ManifestRow] = []
    while len(chosen) < n and any(orders.values()):
        for task in turn:
            if orders[task] and len(chosen) < n:
                chosen.append(by_task[task][orders[task].pop(0)])
    return chosen


def rl_batches(samples: Sequence, batch_size: int, seed: int | Sequence[int],
               key=lambda s: s.inputs.shape[0]) -> list[list]:
    """Global batches of exactly batch_size samples that share `key` (their number of input images).

    Every sample lands in a batch: a bucket's last partial batch is topped up with samples of the same
    bucket drawn again, so each rank runs the same number of micro batches (collectives need that).
    """
    rng = np.random.default_rng(seed)
    buckets: dict[int, list] = defaultdict(list)
    for sample in samples:
        buckets[key(sample)].append(sample)
    batches = []
    for _, bucket in sorted(buckets.items()):
        order = [bucket[i] for i in rng.permutation(len(bucket))]
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < batch_size:
                batch += [bucket[i] for i in rng.choice(len(bucket), batch_size - len(batch))]
            batches.append(batch)
    return [batches[i] for i in rng.permutation(len(batches))]
