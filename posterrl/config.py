"""Typed run configuration: YAML with one section per role, dotted CLI overrides, validation.

Everything a run needs is checked here, before Ray or any model starts. Errors name the key
path, the bad value and what was expected, and suggest the nearest key for a typo.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The pipeline order; a config lists a subsequence of it.
STAGE_ORDER = ("data", "sft", "distill", "reward", "rl", "eval")
# Stages this version can run. The others are part of the CLI contract and arrive with later work.
IMPLEMENTED_STAGES = ("data", "sft", "distill", "reward", "rl", "eval")
POLICY_KINDS = ("tiny_flux", "flux_kontext", "qwen_image_edit")
IMPLEMENTED_POLICY_KINDS = ("tiny_flux",)


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem found."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dir: str | None = None  # where generated data goes; default <run_dir>/data
    n_train: int = Field(64, ge=1)  # posters; each yields one sample of every task
    n_val: int = Field(8, ge=1)
    # Posters whose prompts serve only as preference-pair prompts for the reward stage (generated data only).
    n_reward: int = Field(0, ge=0)
    seed: int = 0
    size: int = Field(64, ge=32, le=2048)  # long side of a poster, px
    train_manifest: str | None = None  # user data instead of generated posters
    val_manifest: str | None = None
    tasks: list[Literal["extending", "filling", "rescaling", "identity-driven", "layout-driven", "style-driven"]] = Field(
        default_factory=lambda: ["extending", "filling", "rescaling", "identity-driven", "layout-driven", "style-driven"],
        min_length=1,
    )
    chunks: int = Field(4, ge=1)  # parallel generation tasks on the cluster


class TransformerConfig(_Section):
    num_layers: int = Field(2, ge=1)  # double-stream (text+image) blocks
    num_single_layers: int = Field(2, ge=0)
    attention_head_dim: int = Field(32, ge=4)
    num_attention_heads: int = Field(4, ge=1)
    axes_dims_rope: list[int] = Field(default_factory=lambda: [8, 12, 12], min_length=3, max_length=3)


class TextEncoderConfig(_Section):
    d_model: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    d_ff: int = Field(128, ge=8)
    max_length: int = Field(96, ge=8)  # bytes of instruction kept


class ModelConfig(_Section):
    kind: Literal["tiny_flux", "flux_kontext", "qwen_image_edit"] = "tiny_flux"
    pretrained_path: str | None = None  # local directory for real models; nothing is downloaded
    resolution: int = Field(64, ge=16)  # square canvas the policy works on, px
    patch_size: int = Field(4, ge=1)
    max_inputs: int = Field(3, ge=1)  # reference images per sample
    seed: int = 0  # initialisation of a policy built from config
    transformer: TransformerConfig = Field(default_factory=TransformerConfig)
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)


class RolloutConfig(_Section):
    num_actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(0.5, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    group_size: int = Field(4, ge=1)  # K samples per prompt
    solver: Literal["euler", "heun"] = "euler"
    num_steps: int = Field(8, ge=1)
    shift: float = Field(1.0, gt=0)  # timestep shift of FlowMatchEulerDiscreteScheduler
    seed: int = 0
    eval_per_task: int = Field(4, ge=1)  # held-out prompts per task in an evaluation
    # How the rl stage's weights reach the actors: one object in the Ray object store that every actor
    # reads (CPU default), or a broadcast from learner rank 0 on a process group of its own (NCCL on GPU).
    weight_sync: Literal["object_store", "broadcast"] = "object_store"


class ScorerConfig(_Section):
    name: str  # the key in the registry, in metric names (reward/<name>/...) and in the CLI
    kind: Literal["bradley_terry", "vlm_judge", "preservation", "ocr_title"]
    weight: float = 1.0  # 0 runs the scorer in shadow: scored and logged, not counted
    # bradley_terry: a saved reward model (null: the one the reward stage trains);
    # vlm_judge: a local Qwen2-VL / Qwen2.5-VL directory, or the served model's name for backend openai.
    path: str | None = None
    backend: Literal["transformers", "vllm", "openai"] | None = None  # vlm_judge only
    url: str | None = None  # vlm_judge with backend openai: the server's base URL, e.g. http://127.0.0.1:8000/v1


class BradleyTerryConfig(_Section):
    """The reward stage: a Bradley-Terry reward model trained on preference pairs in the cluster."""

    backbone: Literal["conv", "vlm"] = "conv"  # conv: small vision network; vlm: Qwen2-VL class + MLP head
    vlm_path: str | None = None  # backbone vlm: a local Qwen2-VL / Qwen2.5-VL directory
    lora_rank: int = Field(0, ge=0)  # backbone vlm: 0 trains the whole backbone
    channels: int = Field(32, ge=4)  # backbone conv: width of the first stage
    image_size: int = Field(32, ge=16)  # backbone conv: square canvas the images are letterboxed into
    steps: int = Field(400, ge=1)
    batch_size: int = Field(32, ge=1)  # pairs per optimizer step, across ranks
    lr: float = Field(1e-3, gt=0)
    samples_per_prompt: int = Field(4, ge=2)  # policy samples per training prompt, ranked into pairs
    annotator_noise: float = Field(0.01, ge=0)  # std of Gaussian noise added to the gold metric before ranking
    tie_threshold: float = Field(0.0, ge=0)  # |noisy gold difference| below this is a tie
    ties: Literal["skip", "rao_kupper"] = "skip"  # drop ties, or fit them with Rao-Kupper BT-with-ties
    tie_theta: float = Field(1.5, gt=1.0)  # Rao-Kupper threshold parameter (theta > 1)
    margin: float = Field(0.0, ge=0)  # constant margin: -log sigmoid(r_w - r_l - margin)
    negative_pairs: bool = True  # PosterOmni: the unedited input as the rejected sample
    augment: bool = True  # backbone conv: the same random flip and channel permutation for both sides of a pair
    difference_channels: bool = False  # backbone conv: also feed output - input, |output - input| and a high-pass
    preference_manifest: str | None = None  # user pairs (JSONL: id, task, instruction, inputs, chosen, rejected, tie)
    eval_every: int = Field(100, ge=1)


class RewardConfig(_Section):
    scorers: list[ScorerConfig] = Field(default_factory=list)
    cpus: float = Field(0.25, ge=0)
    gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(32, ge=1)  # samples scored together by dynamic batching
    max_wait_ms: float = Field(5.0, ge=0)  # how long a batch waits to fill up
    request_timeout_s: float = Field(120.0, gt=0)  # a scorer slower than this is counted as failed for the batch
    probe_size: int = Field(4, ge=1)  # samples a new scorer must score before it goes live
    bt: BradleyTerryConfig = Field(default_factory=BradleyTerryConfig)


class RlConfig(_Section):
    """The `rl` stage: DiffusionNFT on the policy's own rollouts (DESIGN.md has the formulas)."""

    epochs: int = Field(30, ge=1)  # sample -> score -> train -> publish rounds
    prompts_per_epoch: int = Field(16, ge=1)  # prompt groups per epoch, each with rollout.group_size samples
    mode: Literal["sync", "off_policy"] = "sync"  # off_policy: epoch e+1's rollouts run while epoch e trains
    max_staleness: int = Field(1, ge=1)  # off_policy: rollouts may come from a policy this many updates old
    lr: float = Field(3e-4, gt=0)
    batch_size: int = Field(16, ge=1)  # samples per optimizer step, across ranks (micro batches: learner.*)
    passes: int = Field(1, ge=1)  # passes over an epoch's samples
    # The std advantages are divided by: over the whole batch (DiffusionNFT's "global std"), or over the
    # batch's samples of the same task (one scale per task, so no task's reward range outweighs the others).
    advantage_std: Literal["batch", "task"] = "batch"
    beta: float = Field(1.0, gt=0)  # NFT: distance of the implicit positive/negative policies from v_old
    adv_max: float = Field(5.0, gt=0)  # A_max: advantage clip, and the r mapping's scale
    kl_coef: float = Field(1e-4, ge=0)  # weight of ||v_theta - v_ref||^2, v_ref the policy RL started from
    eta_rate: float = Field(0.001, ge=0)  # sampling policy: eta = min(eta_rate * update, eta_max)
    eta_max: float = Field(0.5, ge=0, lt=1)
    min_group_std: float | None = Field(None, ge=0)  # skip prompt groups whose rewards spread less (Edit-R1: 0.05)
    retire_threshold: float | None = None  # retire prompts whose group mean stays above this
    retire_patience: int = Field(2, ge=1)  # ... for this many epochs in a row
    eval_every: int = Field(10, ge=1)  # epochs between held-out gold evaluations
    checkpoint_every: int = Field(10, ge=1)  # epochs between checkpoints (resume with --resume)
    log_groups: int = Field(1, ge=0)  # prompt groups per task drawn as TensorBoard image grids each logged epoch
    log_images_every: int = Field(5, ge=1)  # epochs between TensorBoard image grids
    dump_every: int = Field(10, ge=1)  # epochs between rollout dumps (PNG + JSONL) under <run>/rollouts/
    seed: int = 0


class LearnerConfig(_Section):
    num_ranks: int = Field(1, ge=1)
    cpus_per_rank: float = Field(0.5, ge=0)
    gpus_per_rank: float = Field(0.0, ge=0)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)  # global, across ranks and accumulation
    micro_batch_size: int = Field(8, ge=1)  # per rank per forward
    sft_steps: int = Field(200, ge=1)  # per expert
    distill_steps: int = Field(200, ge=1)
    lambda_expert: float = Field(1.0, ge=0)  # weight of ||v_student - v_expert||^2 (PosterOmni: 1)
    distill_init: Literal["config", "local", "global"] = "local"  # the student's starting weights
    eval_every: int = Field(100, ge=1)  # steps between held-out gold evaluations
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0


class DeepSpeedConfig(_Section):
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["fp32", "bf16"] = "fp32"
    offload_optimizer: bool = False


class ClusterConfig(_Section):
    address: str | None = None  # join an existing Ray cluster; None starts a local one
    num_cpus: float | None = Field(4, gt=0)  # logical CPUs of a local cluster (more than cores keeps 2 cores from deadlocking)
    num_gpus: int | None = Field(None, ge=0)


class LoggingConfig(_Section):
    tensorboard: bool = True
    progress: bool = True
    image_grids: bool = True


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    rl: RlConfig = Field(default_factory=RlConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    stages: list[Literal["data", "sft", "distill", "reward", "rl", "eval"]] = Field(
        default_factory=lambda: ["data", "eval"], min_length=1
    )

    @model_validator(mode="after")
    def _cross_field(self) -> "Config":
        problems = self.cross_field_problems()
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def cross_field_problems(self) -> list[str]:
        """Checks that span several keys; each message names the keys involved."""
        problems: list[str] = []
        m, t = self.model, self.model.transformer
        if m.resolution % m.patch_size:
            problems.append(
                f"model.resolution={m.resolution} must be a multiple of model.patch_size={m.patch_size}"
            )
        if sum(t.axes_dims_rope) != t.attention_head_dim:
            problems.append(
                f"model.transformer.axes_dims_rope={t.axes_dims_rope} must sum to "
                f"model.transformer.attention_head_dim={t.attention_head_dim} (rotary axes split one head)"
            )
        if any(d % 2 for d in t.axes_dims_rope):
            problems.append(f"model.transformer.axes_dims_rope={t.axes_dims_rope} must all be even")
        te = m.text_encoder
        if te.d_model % te.num_heads:
            problems.append(
                f"model.text_encoder.d_model={te.d_model} must be a multiple of model.text_encoder.num_heads={te.num_heads}"
            )
        if m.kind != "tiny_flux" and not m.pretrained_path:
            problems.append(f"model.kind={m.kind!r} needs model.pretrained_path (a local directory; nothing is downloaded)")
        order = [STAGE_ORDER.index(s) for s in self.stages]
        if order != sorted(order) or len(set(order)) != len(order):
            problems.append(
                f"stages={self.stages} must be distinct and in pipeline order {list(STAGE_ORDER)}"
            )
        if "data" not in self.stages:
            problems.append(f"stages={self.stages} must start with 'data' (it generates or loads the manifests "
                            "every later stage reads; with data.train_manifest it only loads them)")
        if self.data.n_reward and self.data.train_manifest:
            problems.append(f"data.n_reward={self.data.n_reward} generates reward-stage posters, but data.train_manifest "
                            "is set (user data): use reward.bt.preference_manifest for extra pairs instead")
        lr = self.learner
        per_step = lr.num_ranks * lr.micro_batch_size
        if lr.batch_size % per_step:
            problems.append(
                f"learner.batch_size={lr.batch_size} must be a multiple of learner.num_ranks * "
                f"learner.micro_batch_size = {lr.num_ranks} * {lr.micro_batch_size} = {per_step}"
            )
        if "rl" in self.stages and self.rollout.group_size < 2:
            problems.append(
                f"rollout.group_size={self.rollout.group_size}: the rl stage compares samples within a "
                "prompt group, so it needs at least 2"
            )
        rl = self.rl
        if "rl" in self.stages:
            if rl.batch_size % per_step:
                problems.append(
                    f"rl.batch_size={rl.batch_size} must be a multiple of learner.num_ranks * "
                    f"learner.micro_batch_size = {lr.num_ranks} * {lr.micro_batch_size} = {per_step}"
                )
            if not self.reward.scorers:
                problems.append("stages has 'rl' but reward.scorers is empty: the rl stage needs a reward to optimise")
            if rl.retire_threshold is None and rl.retire_patience != 2:
                problems.append(f"rl.retire_patience={rl.retire_patience} has no effect without rl.retire_threshold")
            if rl.mode == "sync" and rl.max_staleness != 1:
                problems.append(f"rl.max_staleness={rl.max_staleness} applies to rl.mode=off_policy only "
                                "(sync rollouts always come from the newest sampling policy)")
        if self.cluster.address is None and self.cluster.num_cpus is not None:
            need = self.cpus_requested()
            if need > self.cluster.num_cpus:
                problems.append(
                    f"actors ask for {need:g} CPUs (rollout.num_actors * rollout.cpus_per_actor + "
                    f"learner.num_ranks * learner.cpus_per_rank + reward.cpus) but cluster.num_cpus="
                    f"{self.cluster.num_cpus:g}: they would wait forever for resources"
                )
        names = [s.name for s in self.reward.scorers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"reward.scorers has duplicate names {dupes}")
        for index, scorer in enumerate(self.reward.scorers):
            where = f"reward.scorers[{index}] ({scorer.name})"
            if scorer.kind == "vlm_judge":
                if scorer.backend is None or scorer.path is None:
                    problems.append(f"{where}: kind vlm_judge needs backend (transformers, vllm or openai) and path "
                                    "(a local model directory, or the served model's name for openai)")
                if scorer.backend == "openai" and not scorer.url:
                    problems.append(f"{where}: backend openai needs url, e.g. http://127.0.0.1:8000/v1")
            elif scorer.backend is not None or scorer.url is not None:
                problems.append(f"{where}: backend and url only apply to kind vlm_judge, not {scorer.kind}")
        if "reward" in self.stages and not any(
            s.kind == "bradley_terry" and s.path is None for s in self.reward.scorers
        ):
            problems.append("stages has 'reward' but reward.scorers has no bradley_terry scorer without a path "
                            "to serve the model it trains, e.g. {name: bt, kind: bradley_terry, weight: 1.0}")
        bt = self.reward.bt
        if bt.backbone == "vlm" and bt.augment:
            problems.append("reward.bt.augment=true applies to the conv backbone only; set it false with backbone vlm")
        if bt.backbone == "vlm" and not bt.vlm_path:
            problems.append("reward.bt.backbone=vlm needs reward.bt.vlm_path (a local Qwen2-VL directory)")
        if "reward" in self.stages and bt.batch_size % lr.num_ranks:
            problems.append(f"reward.bt.batch_size={bt.batch_size} must be a multiple of "
                            f"learner.num_ranks={lr.num_ranks} (each rank takes an equal share of the pairs)")
        return problems

    def cpus_requested(self) -> float:
        return (
            self.rollout.num_actors * self.rollout.cpus_per_actor
            + self.learner.num_ranks * self.learner.cpus_per_rank
            + self.reward.cpus
        )

    def runnable_problems(self) -> list[str]:
        """What stops this version from running the config (checked before any actor starts)."""
        problems = []
        missing = [s for s in self.stages if s not in IMPLEMENTED_STAGES]
        if missing:
            problems.append(
                f"stages {missing} are not available in this version of posterrl (it runs {list(IMPLEMENTED_STAGES)})"
            )
        if self.model.kind not in IMPLEMENTED_POLICY_KINDS:
            problems.append(
                f"model.kind={self.model.kind!r} is not available in this version of posterrl "
                f"(it builds {list(IMPLEMENTED_POLICY_KINDS)})"
            )
        for key in ("train_manifest", "val_manifest"):
            path = getattr(self.data, key)
            if path and not Path(path).is_file():
                problems.append(f"data.{key}={path!r}: no such file")
        for index, scorer in enumerate(self.reward.scorers):
            local = scorer.kind == "bradley_terry" or (scorer.kind == "vlm_judge" and scorer.backend != "openai")
            if local and scorer.path and not Path(scorer.path).is_dir():
                problems.append(f"reward.scorers[{index}] ({scorer.name}).path={scorer.path!r}: no such directory")
        bt = self.reward.bt
        if bt.preference_manifest and not Path(bt.preference_manifest).is_file():
            problems.append(f"reward.bt.preference_manifest={bt.preference_manifest!r}: no such file")
        if bt.backbone == "vlm" and bt.vlm_path and not Path(bt.vlm_path).is_dir():
            problems.append(f"reward.bt.vlm_path={bt.vlm_path!r}: no such directory")
        if self.model.pretrained_path and not Path(self.model.pretrained_path).is_dir():
            problems.append(f"model.pretrained_path={self.model.pretrained_path!r}: no such directory")
        return problems

    def derived_sizes(self) -> dict[str, Any]:
        """Sizes that follow from several keys, printed at the start of a run."""
        m, lr = self.model, self.learner
        tokens_per_image = (m.resolution // m.patch_size) ** 2
        n_tasks = len(self.data.tasks)
        return {
            "train samples (posters x tasks)": self.data.n_train * n_tasks,
            "held-out samples": self.data.n_val * n_tasks,
            "reward-stage preference prompts (train + data.n_reward posters, x tasks)":
                (self.data.n_train + self.data.n_reward) * n_tasks,
            "eval prompts": self.rollout.eval_per_task * n_tasks,
            "image tokens per canvas": tokens_per_image,
            "max sequence (text + output + inputs)": m.text_encoder.max_length + tokens_per_image * (1 + m.max_inputs),
            "gradient accumulation steps": lr.batch_size // (lr.num_ranks * lr.micro_batch_size),
            "samples per rollout prompt group": self.rollout.group_size,
            "rl samples per epoch (prompts x group)": self.rl.prompts_per_epoch * self.rollout.group_size,
            "rl optimizer steps per epoch (at least)": self.rl.passes * -(-self.rl.prompts_per_epoch * self.rollout.group_size
                                                                 // self.rl.batch_size),
            "rl gradient accumulation steps": self.rl.batch_size // (lr.num_ranks * lr.micro_batch_size),
            "CPUs requested by actors": self.cpus_requested(),
        }

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------- loading and errors


def _known_keys(model_cls: type[BaseModel], path: tuple) -> list[str]:
    """Field names of the section at `path` (for typo suggestions)."""
    cls: Any = model_cls
    for part in path:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        elif inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
            cls = inner[0]  # list[Section]
        else:
            return []
    return list(cls.model_fields)


def _format_error(err: dict, source: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        known = _known_keys(Config, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(str(p) for p in loc[:-1] + (close[0],))}'?" if close else ""
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return f"{source}: unknown key '{key}'{hint} (known keys in {where}: {', '.join(known)})"
    if kind == "value_error" and not loc:
        return f"{source}: {err['msg'].removeprefix('Value error, ')}"
    got = err.get("input")
    return f"{source}: {key}: got {got!r}, expected {_expected(err)}"


def _expected(err: dict) -> str:
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()))
        return f"a number {op} {bound}"
    return err["msg"][0].lower() + err["msg"][1:]


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. learner.lr=1e-4")
        key, raw = item.split("=", 1)
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: malformed key path {key!r}")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(raw)
    for parts, value in parse_overrides(overrides):
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(parts)}: '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return out


def validate_dict(raw: Any, source: str = "config") -> Config:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(e, source) for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    source = str(path) + (f" with overrides {overrides}" if overrides else "")
    return validate_dict(apply_overrides(raw or {}, overrides or []), source)
