"""Names of the files a learner checkpoint folder holds, shared by the learner and the driver.

Kept apart from learner/ so the driver can find a checkpoint without importing DeepSpeed.
"""

LATEST_FILE = "latest.json"  # {"tag": "step_NNNNNNN", "step": N}: the newest complete checkpoint
