"""The size rl rollouts are scored and dumped at (actors/rollout_group.py); no cluster needed.

Scoring an epoch's rollouts moved to tests/learner/test_scoring.py with learner/scoring.py.
"""

import torch

from posterrl.data.manifest import ManifestRow
from rollout.worker import RolloutGroup


def test_output_size_is_the_targets_else_the_aspect_at_the_first_inputs_long_side(tmp_path):
    from PIL import Image

    from actors.rollout_group import output_size

    Image.new("RGB", (48, 64)).save(tmp_path / "target.png")
    Image.new("RGB", (60, 40)).save(tmp_path / "input.png")
    wide = RolloutGroup("p", "rescaling", "", torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), (4.0, 3.0), 0, 0)
    tall = RolloutGroup("p", "rescaling", "", torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), (3.0, 4.0), 0, 0)
    with_target = ManifestRow("p", "rescaling", "", [tmp_path / "input.png"], tmp_path / "target.png")
    without = ManifestRow("p", "rescaling", "", [tmp_path / "input.png"], None)
    assert output_size(with_target, wide) == (48, 64)
    assert output_size(without, wide) == (60, 45) and output_size(without, tall) == (45, 60)
