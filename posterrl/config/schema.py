"""The run configuration's schema: one pydantic section per role, and `Config`, the whole file.

Field checks (ranges, choices) live beside each field; checks that span keys are the per-section
validators of posterrl/config/validate.py, which `Config` runs once every section has parsed.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posterrl.config import validate
from posterrl.names import JudgeBackend, ModelKind, ScorerKind, SolverName, StageName, TaskName


class _Section(BaseModel):
    # allow_inf_nan=False: YAML's .nan and .inf (a weight, a learning rate, rl.adv_max...) are rejected in every
    # section with the key named, instead of turning every loss or reward downstream into NaN.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _all_tasks() -> list[TaskName]:
    return list(get_args(TaskName))  # posterrl.names.TASKS, typed as the field is


def _default_stages() -> list[StageName]:
    return ["data", "eval"]


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
    tasks: list[TaskName] = Field(default_factory=_all_tasks, min_length=1)
    chunks: int = Field(4, ge=1)  # parallel generation tasks on the cluster
    # A manifest (generated or user) whose share of bad rows (skipped, each with its reason) is above this
    # stops the run before any training: so many bad rows usually mean a wrong file or image folder.
    max_bad_fraction: float = Field(0.1, ge=0, le=1)


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


def _default_lora_targets() -> list[str]:
    # The attention projections of both streams of every FLUX / Qwen-Image block (diffusers' module names).
    return ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class LoraSettings(_Section):
    """LoRA on a released pipeline's transformer (peft). rank 0 trains the transformer in full."""

    rank: int = Field(0, ge=0)
    alpha: float | None = Field(None, gt=0)  # None: alpha = rank (scale 1)
    target_modules: list[str] = Field(default_factory=_default_lora_targets, min_length=1)


class ModelConfig(_Section):
    kind: ModelKind = "tiny_flux"
    pretrained_path: str | None = None  # local directory for real models; nothing is downloaded
    # Square canvas the policy works on, px. At most 2048 (as data.size): the tokens per image grow with its
    # square, (resolution / patch_size)^2, and the sequence holds 1 + max_inputs images, so a larger canvas
    # is a typo (an extra digit) rather than a model any machine here could hold.
    resolution: int = Field(64, ge=16, le=2048)
    patch_size: int = Field(4, ge=1)
    max_inputs: int = Field(3, ge=1)  # reference images per sample
    # tiny_flux: the first input's patch also rides in the channels of the noisy token at the same place
    # (InstructPix2Pix-style), so keeping what the input shows is a per-token map rather than an attention lookup.
    input_concat: bool = False
    # tiny_flux: an edit of one input image runs its flow on the difference between the output and that image (zero
    # where the edit keeps it), so the noise at t = 1 is centred on the input rather than on mid-gray. Samples with
    # several inputs compose a new poster from them and keep the plain canvas flow (docs/ablation.md: residual
    # latents help the one-input tasks and ruin layout-driven).
    residual: bool = False
    # tiny_flux: what the transformer's output is. velocity: v itself (FLUX). sample: the clean latents x0_hat,
    # and v = (x_t - x0_hat) / t, so the sampler's last step returns the network's denoised output and no noise
    # has to pass through the network (docs/ablation.md). sample_for_edits: x0_hat for one-input edits (the samples
    # `residual` applies to), v for compositions of several inputs, whose layout forms at high t where an x0 error
    # weighs least. Wherever x0 is predicted, sft and distill regress it with weight t^2 (Policy.loss_weight).
    prediction: Literal["velocity", "sample", "sample_for_edits"] = "velocity"
    # A one-input edit whose output has another aspect than its input (rescaling: meta.target_aspect) shows the
    # policy its input stretched to the output's aspect, so that "no edit" is the stretched poster (what the
    # unedited-input baseline scores) and the policy learns to move the elements from there (docs/ablation.md).
    stretch_rescaled_input: bool = False
    # tiny_flux with residual: a one-input edit whose input is already in the output's frame (extending, filling,
    # identity-driven) is output as that input at its own resolution plus the canvas's change upsampled, so what
    # the edit keeps keeps its detail (docs/ablation.md). Only the output images change; training sees canvases.
    input_detail: bool = False
    # tiny_flux: the transformer's output projection starts at zero (DiT's adaLN-Zero convention), so an untrained
    # residual x0-predicting policy returns its input exactly and training starts from "do nothing".
    zero_init_output: bool = False
    seed: int = 0  # initialisation of a policy built from config
    transformer: TransformerConfig = Field(default_factory=TransformerConfig)
    # tiny_flux: the policy's own text encoder; flux_kontext reads text_encoder.max_length only (T5 tokens kept,
    # the pipeline's max_sequence_length) and keeps the checkpoint's encoders, frozen.
    text_encoder: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    # Released pipelines only (flux_kontext): the adapters trained, the distilled guidance scale the policy
    # samples and trains at (FLUX.1 Kontext [dev] examples use 2.5), and gradient checkpointing of the transformer.
    lora: LoraSettings = Field(default_factory=LoraSettings)
    guidance: float = Field(2.5, gt=0)
    gradient_checkpointing: bool = False


class RolloutConfig(_Section):
    num_actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(0.5, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    group_size: int = Field(4, ge=1)  # K samples per prompt
    solver: SolverName = "euler"
    num_steps: int = Field(8, ge=1)
    shift: float = Field(1.0, gt=0)  # timestep shift of FlowMatchEulerDiscreteScheduler
    seed: int = 0
    eval_per_task: int = Field(4, ge=1)  # held-out prompts per task in an evaluation
    # The dtype the actors sample in: bf16 halves a released model's memory and runs on the GPU's bf16 units (the
    # GPU presets); the learner's theta_old arrives in float32 and is rounded on load. Sync checks compare against
    # theta_old rounded the same way (posterrl/weight_sync.py), so a bf16 actor is held to the same exactness.
    dtype: Literal["fp32", "bf16"] = "fp32"
    # How the rl stage's weights reach the actors: one object in the Ray object store that every actor
    # reads (CPU default), or a broadcast from learner rank 0 on a process group of its own (NCCL on GPU).
    weight_sync: Literal["object_store", "broadcast"] = "object_store"
    # A rollout actor that dies is restarted by Ray this many times (-1: always); its unfinished chunks are
    # sampled again, with the same rows, seed and weights, up to max_chunk_attempts times each.
    max_restarts: int = Field(-1, ge=-1)
    max_chunk_attempts: int = Field(8, ge=1)
    # Every this many rl weight syncs (0: never) each actor's policy output on a fixed input is compared with
    # learner rank 0's theta_old (posterrl/weight_sync.py), beside the fingerprint every sync is checked with.
    probe_every: int = Field(10, ge=0)
    # Custom Ray resources each actor asks for besides CPUs and GPUs: pins the role to the nodes that offer them
    # (`ray start --resources='{"rollout": 8}'`, docs/scaling.md). The same key in learner and reward.
    resources: dict[str, float] = Field(default_factory=dict)


class ScorerConfig(_Section):
    name: str  # the key in the registry, in metric names (reward/<name>/...) and in the CLI
    kind: ScorerKind
    weight: float = 1.0  # 0 runs the scorer in shadow: scored and logged, not counted
    # bradley_terry: a saved reward model (null: the one the reward stage trains);
    # vlm_judge: a local Qwen2-VL / Qwen2.5-VL directory, or the served model's name for backend openai.
    path: str | None = None
    backend: JudgeBackend | None = None  # vlm_judge only
    url: str | None = None  # vlm_judge with backend openai: the server's base URL, e.g. http://127.0.0.1:8000/v1
    # vlm_judge with backend openai: the NAME of the environment variable holding the server's API key, sent
    # as "Authorization: Bearer <key>" (the key itself never goes into a config, which runs log and copy).
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    optional: bool = False  # a (re)starting reward server may serve without it when it fails to load


class RewardConfig(_Section):
    """The run's reward server: which scorers it serves and how it batches them."""

    scorers: list[ScorerConfig] = Field(default_factory=list)
    cpus: float = Field(0.25, ge=0)
    gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(32, ge=1)  # samples scored together by dynamic batching
    max_wait_ms: float = Field(5.0, ge=0)  # how long a batch waits to fill up
    request_timeout_s: float = Field(120.0, gt=0)  # a scorer slower than this is counted as failed for the batch
    max_abs_score: float = Field(1000.0, gt=0)  # a score with |score| above this is dropped as out of range
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources (see rollout.resources)
    probe_size: int = Field(4, ge=1)  # samples a new scorer must score before it goes live


class RewardModelConfig(_Section):
    """The `reward` stage: a Bradley-Terry reward model trained on preference pairs in the cluster."""

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


class SftConfig(_Section):
    """The `sft` stage: one expert per regime (local editing, global creation), flow matching on data."""

    steps: int = Field(200, ge=1)  # per expert
    # One regime's own number of steps (None: `steps`); the local tasks keep gaining long after the global ones
    # stop paying for their time (docs/ablation.md).
    local_steps: int | None = Field(None, ge=1)
    global_steps: int | None = Field(None, ge=1)
    lr: float = Field(3e-4, gt=0)
    batch_size: int = Field(8, ge=1)  # global, across ranks and accumulation (micro batches: learner.*)
    eval_every: int = Field(100, ge=1)  # steps between held-out gold evaluations
    checkpoint_every: int = Field(100, ge=1)  # steps between checkpoints (resume with --resume)

    def steps_for(self, regime: str) -> int:
        """Optimizer steps of the expert of `regime` (local or global)."""
        own = {"local": self.local_steps, "global": self.global_steps}[regime]
        return self.steps if own is None else own


class DistillConfig(_Section):
    """The `distill` stage: one student from both sft experts (PosterOmni task distillation)."""

    steps: int = Field(200, ge=1)
    lr: float = Field(3e-4, gt=0)
    batch_size: int = Field(8, ge=1)  # global, across ranks and accumulation (micro batches: learner.*)
    lambda_expert: float = Field(1.0, ge=0)  # weight of ||v_student - v_expert||^2 (PosterOmni: 1)
    init: Literal["config", "local", "global"] = "local"  # the student's starting weights
    eval_every: int = Field(100, ge=1)  # steps between held-out gold evaluations
    checkpoint_every: int = Field(100, ge=1)  # steps between checkpoints (resume with --resume)


class RlConfig(_Section):
    """The `rl` stage: DiffusionNFT on the policy's own rollouts (docs/design.md has the formulas)."""

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
    kl_coef: float = Field(1e-4, ge=0)  # weight of ||v_theta - v_ref||^2
    # v_ref's policy: start, the one rl started from (the distilled student); base, the released model with no
    # fine-tuning at all (with LoRA the adapters off, as DiffusionNFT anchors to the base model).
    kl_reference: Literal["start", "base"] = "start"
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
    # Reward guard: when more than this fraction of an epoch's samples has no reward (a live scorer failed)
    # for unscored_patience epochs in a row, the run stops and names the scorer and its failures.
    max_unscored_fraction: float = Field(0.5, ge=0, le=1)
    unscored_patience: int = Field(2, ge=1)


class LearnerConfig(_Section):
    """The learner group every training stage (sft, distill, reward, rl) runs on, and what they share."""

    num_ranks: int = Field(1, ge=1)
    cpus_per_rank: float = Field(0.5, ge=0)
    gpus_per_rank: float = Field(0.0, ge=0)
    micro_batch_size: int = Field(8, ge=1)  # per rank per forward
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    resources: dict[str, float] = Field(default_factory=dict)  # per rank, custom Ray resources (rollout.resources)


class DeepSpeedConfig(_Section):
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["fp32", "bf16"] = "fp32"
    offload_optimizer: bool = False


class ClusterConfig(_Section):
    address: str | None = None  # join an existing Ray cluster; None starts a local one
    # Logical CPUs of a local cluster (more than cores keeps 2 cores from deadlocking).
    num_cpus: float | None = Field(4, gt=0)
    num_gpus: int | None = Field(None, ge=0)
    # The Ray dashboard of a local cluster (what `ray list actors` and ray.util.state talk to), behind the
    # cluster's token; bound to loopback unless dashboard_host says otherwise (docs/security.md).
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    # The longest the driver waits on actors without any of them answering: a hung learner rank, rollout
    # actor or reward server stops the run after this, naming it (a dead one is noticed at once).
    call_timeout_s: float = Field(600.0, gt=0)
    # Where the learner ranks and rollout actors sit (docs/scaling.md). disaggregated: each role in a placement
    # group of its own (rollouts and training on separate GPUs, running at once in rl.mode off_policy).
    # colocated: rollout actor i shares learner rank i % num_ranks's bundle (one GPU holds both; the rollout
    # policy leaves the GPU while the learner trains).
    placement: Literal["disaggregated", "colocated"] = "disaggregated"


class LoggingConfig(_Section):
    tensorboard: bool = True
    progress: bool = True
    image_grids: bool = True


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    reward_model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    rl: RlConfig = Field(default_factory=RlConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    stages: list[StageName] = Field(default_factory=_default_stages, min_length=1)

    @model_validator(mode="after")
    def _cross_field(self) -> Config:
        problems = self.cross_field_problems()
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def cross_field_problems(self) -> list[str]:
        """Checks that span several keys (every section's validator); each message names the keys involved."""
        return validate.cross_field_problems(self)

    def cpus_requested(self) -> float:
        return validate.cpus_requested(self)

    def runnable_problems(self, address: str | None = None) -> list[str]:
        """What stops this version from running the config (checked before any actor starts); `address`: the
        cluster --address joins, if any (else cluster.address)."""
        return validate.runnable_problems(self, address)

    def derived_sizes(self) -> dict[str, Any]:
        """Sizes that follow from several keys, printed at the start of a run."""
        return validate.derived_sizes(self)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def field_range(section: type[BaseModel], name: str) -> tuple[Any, Any]:
    """(lowest, highest) a section's field accepts (None where open), for code outside the config that takes
    the same quantity, e.g. `posterrl data generate --size` and data.size."""
    low = high = None
    for bound in section.model_fields[name].metadata:
        low = getattr(bound, "ge", low)
        high = getattr(bound, "le", high)
    return low, high
