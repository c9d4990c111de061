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

    def bucket_schedule(self, step: int) -> list[int]:
        """Bucket index of steps 0..step (drawn from one seeded stream, so it is fixed by the seed)."""
        rng = np.random.default_rng([self.seed, 0])
        return list(rng.choice(len(self.buckets), size=step + 1, p=self.weights))

    def batch(self, step: int) -> list[ManifestRow]:
        schedule = self.bucket_schedule(step)
        bucket_index = schedule[step]
        bucket = self.buckets[bucket_index]
        position = schedule[:step].count(bucket_index) * self.batch_size  # rows of this bucket used before
        out = []
        for k in range(position, position + self.batch_size):
            epoch, offset = divmod(k, len(bucket))
            order = np.random.default_rng([self.seed, 1, bucket_index, epoch]).permutation(len(bucket))
            out.append(bucket[order[offset]])
        return out
