"""The closed lists of names, each defined once: the config's `Literal` types and the tuples that data,
the reward registry and the CLI check against or offer as choices are the same objects.

No imports from posterrl here: everything else may import this module.
"""

from __future__ import annotations

from typing import Literal, get_args

# The six edit tasks; posterrl/data/tasks.py builds one sample of each per poster.
TaskName = Literal["extending", "filling", "rescaling", "identity-driven", "layout-driven", "style-driven"]
TASKS: tuple[str, ...] = get_args(TaskName)

# The pipeline order; a config's `stages` lists a subsequence of it.
StageName = Literal["data", "sft", "distill", "reward", "rl", "eval"]
STAGE_ORDER: tuple[str, ...] = get_args(StageName)

# Policies a config may name (model.kind). Which of them this version builds: posterrl.config.validate.
ModelKind = Literal["tiny_flux", "flux_kontext", "qwen_image_edit"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
# The kinds that are a released diffusers pipeline, loaded from a local folder (model.pretrained_path): a
# downloaded checkpoint, or the tiny random one `posterrl model make-tiny` writes. tiny_flux is posterrl's own.
PIPELINE_MODEL_KINDS: tuple[str, ...] = tuple(kind for kind in MODEL_KINDS if kind != "tiny_flux")

# Reward scorers (reward.scorers[].kind; reward_server/registry.py maps each to its class).
ScorerKind = Literal["bradley_terry", "vlm_judge", "preservation", "ocr_title", "gold_oracle"]
SCORER_KINDS: tuple[str, ...] = get_args(ScorerKind)

# How a vlm_judge scorer runs its model (reward.scorers[].backend).
JudgeBackend = Literal["transformers", "vllm", "openai"]
JUDGE_BACKENDS: tuple[str, ...] = get_args(JudgeBackend)

# ODE solvers of the flow sampler (rollout.solver; rollout/sampler.py's SOLVERS has one step function each).
SolverName = Literal["euler", "heun"]
SOLVER_NAMES: tuple[str, ...] = get_args(SolverName)
