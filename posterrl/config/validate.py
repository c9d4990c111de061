"""Checks that span several keys, one validator per section, plus what a run needs beyond a valid file.

Each validator takes the parsed `Config` and returns messages that name every key involved, with its
value and what was expected. `Config` runs all of `VALIDATORS` once its sections have parsed; this module
does not import the schema at run time (the schema imports it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from posterrl.names import JUDGE_BACKENDS, SCORER_KINDS, STAGE_ORDER

if TYPE_CHECKING:
    from posterrl.config.schema import Config

# Policies this version builds (posterrl/policy.py); the other model kinds validate but do not run.
IMPLEMENTED_POLICY_KINDS = ("tiny_flux", "flux_kontext", "qwen_image_edit")
# Pixels per latent token side of the released pipelines (an 8x VAE, 2 x 2 packed latents).
PIPELINE_TOKEN_PX = 16


def _per_step(cfg: Config) -> int:
    """Samples one optimizer step takes without accumulation: every rank's micro batch."""
    return cfg.learner.num_ranks * cfg.learner.micro_batch_size


def _batch_problem(cfg: Config, key: str, batch_size: int) -> list[str]:
    """A stage's global batch must split into whole micro batches on every rank."""
    lc, per_step = cfg.learner, _per_step(cfg)
    if batch_size % per_step:
        return [f"{key}={batch_size} must be a multiple of learner.num_ranks * learner.micro_batch_size = "
                f"{lc.num_ranks} * {lc.micro_batch_size} = {per_step}"]
    return []


def model_problems(cfg: Config) -> list[str]:
    problems = []
    m, t, te = cfg.model, cfg.model.transformer, cfg.model.text_encoder
    if m.resolution % m.patch_size:
        problems.append(f"model.resolution={m.resolution} must be a multiple of model.patch_size={m.patch_size}")
    if sum(t.axes_dims_rope) != t.attention_head_dim:
        problems.append(
            f"model.transformer.axes_dims_rope={t.axes_dims_rope} must sum to "
            f"model.transformer.attention_head_dim={t.attention_head_dim} (rotary axes split one head)"
        )
    if any(d % 2 for d in t.axes_dims_rope):
        problems.append(f"model.transformer.axes_dims_rope={t.axes_dims_rope} must all be even")
    if te.d_model % te.num_heads:
        problems.append(
            f"model.text_encoder.d_model={te.d_model} must be a multiple of model.text_encoder.num_heads={te.num_heads}"
        )
    if m.kind != "tiny_flux" and not m.pretrained_path:
        problems.append(f"model.kind={m.kind!r} needs model.pretrained_path (a local directory; nothing is downloaded)")
    if m.kind == "tiny_flux" and m.lora.rank:
        problems.append(f"model.lora.rank={m.lora.rank}: LoRA applies to the released pipelines (model.kind "
                        "flux_kontext, qwen_image_edit); tiny_flux trains in full, set model.lora.rank=0")
    if m.kind == "tiny_flux" and m.input_detail and not m.residual:
        problems.append("model.input_detail=true adds the input's detail to the change a residual policy makes; "
                        "set model.residual=true as well, or model.input_detail=false")
    for key in ("input_concat", "residual", "input_detail"):
        if m.kind != "tiny_flux" and getattr(m, key):
            problems.append(f"model.{key}=true: an option of the tiny pixel-space policy (model.kind tiny_flux); "
                            f"{m.kind} keeps its pipeline's conditioning, set model.{key}=false")
    if m.kind != "tiny_flux" and m.prediction != "velocity":
        problems.append(f"model.prediction={m.prediction!r}: an option of the tiny pixel-space policy (model.kind "
                        f"tiny_flux); {m.kind}'s transformer predicts the velocity, set model.prediction=velocity")
    if m.kind != "tiny_flux" and m.resolution % PIPELINE_TOKEN_PX:
        problems.append(f"model.resolution={m.resolution} must be a multiple of {PIPELINE_TOKEN_PX} for "
                        f"model.kind={m.kind!r} (an 8x VAE and 2 x 2 packed latents)")
    return problems


def stages_problems(cfg: Config) -> list[str]:
    problems = []
    order = [STAGE_ORDER.index(s) for s in cfg.stages]
    if order != sorted(order) or len(set(order)) != len(order):
        problems.append(f"stages={cfg.stages} must be distinct and in pipeline order {list(STAGE_ORDER)}")
    if "data" not in cfg.stages:
        problems.append(f"stages={cfg.stages} must start with 'data' (it generates or loads the manifests "
                        "every later stage reads; with data.train_manifest it only loads them)")
    return problems


def data_problems(cfg: Config) -> list[str]:
    if cfg.data.n_reward and cfg.data.train_manifest:
        return [f"data.n_reward={cfg.data.n_reward} generates reward-stage posters, but data.train_manifest "
                "is set (user data): use reward_model.preference_manifest for extra pairs instead"]
    return []


def sft_problems(cfg: Config) -> list[str]:
    return _batch_problem(cfg, "sft.batch_size", cfg.sft.batch_size) if "sft" in cfg.stages else []


def distill_problems(cfg: Config) -> list[str]:
    return _batch_problem(cfg, "distill.batch_size", cfg.distill.batch_size) if "distill" in cfg.stages else []


def rl_problems(cfg: Config) -> list[str]:
    if "rl" not in cfg.stages:
        return []
    rl = cfg.rl
    problems = []
    if rl.kl_reference == "base" and cfg.model.kind == "tiny_flux":
        problems.append("rl.kl_reference=base needs a released model (model.kind flux_kontext or qwen_image_edit): "
                        "the tiny policy is built from random weights, it has no pretrained base to anchor to; "
                        "use rl.kl_reference=start")
    if cfg.rollout.group_size < 2:
        problems.append(f"rollout.group_size={cfg.rollout.group_size}: the rl stage compares samples within a "
                        "prompt group, so it needs at least 2")
    problems += _batch_problem(cfg, "rl.batch_size", rl.batch_size)
    if not cfg.reward.scorers:
        problems.append("stages has 'rl' but reward.scorers is empty: the rl stage needs a reward to optimise")
    if rl.retire_threshold is None and rl.retire_patience != 2:
        problems.append(f"rl.retire_patience={rl.retire_patience} has no effect without rl.retire_threshold")
    rc = cfg.rollout
    if rc.weight_sync == "broadcast" and (0 < rc.gpus_per_actor < 1 or (cfg.cluster.placement == "colocated"
                                                                       and rc.gpus_per_actor > 0)):
        problems.append(f"rollout.weight_sync=broadcast over NCCL needs learner rank 0 and every rollout actor on a "
                        f"GPU of its own (NCCL refuses two ranks on one GPU), but rollout.gpus_per_actor="
                        f"{rc.gpus_per_actor:g} / cluster.placement={cfg.cluster.placement} share one: use "
                        "rollout.weight_sync=object_store")
    if rl.mode == "off_policy" and cfg.cluster.placement == "colocated":
        problems.append("rl.mode=off_policy samples while the learner trains, which cluster.placement=colocated "
                        "rules out (both share a GPU): use rl.mode=sync, or cluster.placement=disaggregated")
    if rl.mode == "sync" and rl.max_staleness != 1:
        problems.append(f"rl.max_staleness={rl.max_staleness} applies to rl.mode=off_policy only "
                        "(sync rollouts always come from the newest sampling policy)")
    return problems


def cluster_problems(cfg: Config) -> list[str]:
    if cfg.cluster.placement == "colocated":
        rc, lc = cfg.rollout, cfg.learner
        if rc.num_actors % lc.num_ranks:
            return [f"cluster.placement=colocated puts rollout actors into the learner ranks' bundles: "
                    f"rollout.num_actors={rc.num_actors} must be a multiple of learner.num_ranks={lc.num_ranks}"]
        gpus = lc.gpus_per_rank + rc.num_actors // lc.num_ranks * rc.gpus_per_actor
        if gpus > 1 and gpus != int(gpus):
            return [f"cluster.placement=colocated: a bundle holds learner.gpus_per_rank + (rollout.num_actors / "
                    f"learner.num_ranks) x rollout.gpus_per_actor = {gpus:g} GPUs; Ray shares a GPU only in "
                    "fractions up to 1 (e.g. 0.5 + 0.5), or whole GPUs"]
    if cfg.cluster.address is None and cfg.cluster.num_cpus is not None:
        need = cpus_requested(cfg)
        if need > cfg.cluster.num_cpus:
            return [f"actors ask for {need:g} CPUs (rollout.num_actors * rollout.cpus_per_actor + "
                    f"learner.num_ranks * learner.cpus_per_rank + reward.cpus) but cluster.num_cpus="
                    f"{cfg.cluster.num_cpus:g}: they would wait forever for resources"]
    return []


# A scorer's name is a registry key, part of metric names (reward/<name>/...) and of paths.
SCORER_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Kinds that load no model: path, backend and url mean nothing to them.
RULE_KINDS = ("preservation", "ocr_title", "gold_oracle")


def scorer_value_problems(name: str, kind: str, weight: float, url: str | None, flag: str = "") -> list[str]:
    """What is wrong with a scorer's name, kind, weight and url whatever loads it: the config's
    reward.scorers[i], `posterrl reward add|swap` and the registry (reward_server/registry.py) all check here.
    `flag` prefixes each key as the caller spells it: "" for config keys, "--" for command-line options."""
    kind_problem = None if kind in SCORER_KINDS else f"{flag}kind {kind!r}: expected one of {', '.join(SCORER_KINDS)}"
    problems = (name_problem(name, flag), kind_problem, weight_problem(weight, flag), url_problem(url, flag))
    return [problem for problem in problems if problem]


def name_problem(name: str, flag: str = "") -> str | None:
    if isinstance(name, str) and SCORER_NAME.fullmatch(name):
        return None
    return (f"{flag}name {name!r}: expected a non-empty name of letters, digits, '_', '.' and '-' "
            "(it becomes part of metric names and paths)")


def weight_problem(weight: float, flag: str = "") -> str | None:
    if isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight):
        return None
    return f"{flag}weight {weight!r}: expected a finite number"


def url_problem(url: str | None, flag: str = "") -> str | None:
    """A judge's server URL must be http(s) with a host (never file:// or a bare path)."""
    if url is None:
        return None
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        return f"{flag}url {url!r}: expected an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000/v1"
    return None


def scorer_option_problems(kind: str, path: str | None, backend: str | None, url: str | None,
                           flag: str = "") -> list[str]:
    """Which options a kind takes: vlm_judge needs backend and path (and url for backend openai); backend and
    url apply to vlm_judge only; the rule kinds load nothing, so they take no path either."""
    problems = []
    if kind == "vlm_judge":
        if backend is None or path is None:
            problems.append(f"kind vlm_judge needs {flag}backend ({', '.join(JUDGE_BACKENDS)}) and {flag}path "
                            "(a local model directory, or the served model's name for openai)")
        if backend == "openai" and not url:
            problems.append(f"{flag}backend openai needs {flag}url, e.g. http://127.0.0.1:8000/v1")
        return problems
    given = [option for option, value in (("backend", backend), ("url", url)) if value is not None]
    if kind in RULE_KINDS and path is not None:
        given.insert(0, "path")
    if given:
        options = " and ".join(f"{flag}{option}" for option in given)
        problems.append(f"{options} {'does' if len(given) == 1 else 'do'} not apply to kind {kind} "
                        f"({'it loads no model' if kind in RULE_KINDS else 'backend and url are for vlm_judge'})")
    return problems


def scorer_problems(name: str, kind: str, weight: float, path: str | None, backend: str | None,
                    url: str | None, flag: str = "") -> list[str]:
    """Every check of one scorer entry: its values, then the options its kind takes."""
    return scorer_value_problems(name, kind, weight, url, flag) + scorer_option_problems(kind, path, backend, url,
                                                                                         flag)


def reward_problems(cfg: Config) -> list[str]:
    problems = []
    names = [s.name for s in cfg.reward.scorers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"reward.scorers has duplicate names {dupes}")
    for index, s in enumerate(cfg.reward.scorers):
        where = f"reward.scorers[{index}] ({s.name!r})"
        problems += [f"{where}: {p}" for p in scorer_problems(s.name, s.kind, s.weight, s.path, s.backend, s.url)]
        if s.api_key_env is not None and s.backend != "openai":
            problems.append(f"{where}: api_key_env applies to kind vlm_judge with backend openai only")
    if "reward" in cfg.stages and not any(s.kind == "bradley_terry" and s.path is None for s in cfg.reward.scorers):
        problems.append("stages has 'reward' but reward.scorers has no bradley_terry scorer without a path "
                        "to serve the model it trains, e.g. {name: bt, kind: bradley_terry, weight: 1.0}")
    return problems


def reward_model_problems(cfg: Config) -> list[str]:
    problems = []
    rm, lc = cfg.reward_model, cfg.learner
    if rm.backbone == "vlm" and rm.augment:
        problems.append("reward_model.augment=true applies to the conv backbone only; set it false with backbone vlm")
    if rm.backbone == "vlm" and not rm.vlm_path:
        problems.append("reward_model.backbone=vlm needs reward_model.vlm_path (a local Qwen2-VL directory)")
    if "reward" in cfg.stages and rm.batch_size % lc.num_ranks:
        problems.append(f"reward_model.batch_size={rm.batch_size} must be a multiple of "
                        f"learner.num_ranks={lc.num_ranks} (each rank takes an equal share of the pairs)")
    return problems


# Every cross-field check, in the order its messages are reported.
def deepspeed_problems(cfg: Config) -> list[str]:
    if cfg.deepspeed.zero_stage == 3 and (cfg.model.kind == "tiny_flux" or cfg.model.lora.rank == 0):
        # theta_old, the KL reference and the distill experts are swapped into the trained module's parameters
        # (learner/tasks/base.py velocity_with); ZeRO-3 keeps only small tensors (the adapters) whole on each rank
        return [f"deepspeed.zero_stage=3 needs LoRA on a released model (model.kind={cfg.model.kind!r}, "
                f"model.lora.rank={cfg.model.lora.rank}): ZeRO-3 partitions the frozen base and keeps the adapters "
                "whole, which theta_old and the experts are swapped into; a policy trained in full would have to be "
                "gathered whole for every swap. Use zero_stage 2 (with deepspeed.offload_optimizer) here"]
    return []


VALIDATORS: tuple[Callable[[Config], list[str]], ...] = (
    model_problems,
    deepspeed_problems,
    stages_problems,
    data_problems,
    sft_problems,
    distill_problems,
    rl_problems,
    cluster_problems,
    reward_problems,
    reward_model_problems,
)


def cross_field_problems(cfg: Config) -> list[str]:
    return [problem for validator in VALIDATORS for problem in validator(cfg)]


def cpus_requested(cfg: Config) -> float:
    return (cfg.rollout.num_actors * cfg.rollout.cpus_per_actor + cfg.learner.num_ranks * cfg.learner.cpus_per_rank
            + cfg.reward.cpus)


def runnable_problems(cfg: Config, address: str | None = None) -> list[str]:
    """What stops this version from running a valid config: model kinds not built yet, paths that do not exist."""
    problems = []
    if cfg.model.kind not in IMPLEMENTED_POLICY_KINDS:
        problems.append(f"model.kind={cfg.model.kind!r} is not available in this version of posterrl "
                        f"(it builds {list(IMPLEMENTED_POLICY_KINDS)})")
    for key in ("train_manifest", "val_manifest"):
        path = getattr(cfg.data, key)
        if path and not Path(path).is_file():
            problems.append(f"data.{key}={path!r}: no such file")
    for index, scorer in enumerate(cfg.reward.scorers):
        local = scorer.kind == "bradley_terry" or (scorer.kind == "vlm_judge" and scorer.backend != "openai")
        if local and scorer.path and not Path(scorer.path).is_dir():
            problems.append(f"reward.scorers[{index}] ({scorer.name}).path={scorer.path!r}: no such directory")
    rm = cfg.reward_model
    if rm.preference_manifest and not Path(rm.preference_manifest).is_file():
        problems.append(f"reward_model.preference_manifest={rm.preference_manifest!r}: no such file")
    if rm.backbone == "vlm" and rm.vlm_path and not Path(rm.vlm_path).is_dir():
        problems.append(f"reward_model.vlm_path={rm.vlm_path!r}: no such directory")
    gpus = (cfg.rollout.num_actors * cfg.rollout.gpus_per_actor + cfg.learner.num_ranks * cfg.learner.gpus_per_rank
            + cfg.reward.gpus)
    if gpus and (address or cfg.cluster.address) is None and local_gpu_count() < gpus:
        problems.append(f"the actors ask for {gpus:g} GPUs (rollout.num_actors x rollout.gpus_per_actor + "
                        f"learner.num_ranks x learner.gpus_per_rank + reward.gpus) and this machine has "
                        f"{local_gpu_count()}: join a GPU cluster (cluster.address / --address) or lower them")
    path = cfg.model.pretrained_path
    if path and not Path(path).is_dir():
        hint = (f" (a tiny one for trying things out: posterrl model make-tiny --kind {cfg.model.kind} --out {path})"
                if cfg.model.kind in PIPELINE_CLASS else "")
        problems.append(f"model.pretrained_path={path!r}: no such directory{hint}")
    elif path and cfg.model.kind in PIPELINE_CLASS:
        problems += pipeline_folder_problems(Path(path), PIPELINE_CLASS[cfg.model.kind])
    return problems


def local_gpu_count() -> int:
    import torch  # here, not at the top: the config modules load without torch for `posterrl config`

    return torch.cuda.device_count()


# The diffusers pipeline class each released model kind's folder must hold (its model_index.json names it).
PIPELINE_CLASS = {"flux_kontext": "FluxKontextPipeline", "qwen_image_edit": "QwenImageEditPipeline"}


def pipeline_folder_problems(folder: Path, class_name: str) -> list[str]:
    """A model.pretrained_path that is not a diffusers folder of the expected pipeline, said before anything starts."""
    index = folder / "model_index.json"
    if not index.is_file():
        return [f"model.pretrained_path={str(folder)!r}: no model_index.json (expected a diffusers {class_name} "
                "folder, e.g. one written by `posterrl model make-tiny` or a downloaded checkpoint)"]
    try:
        found = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as error:
        return [f"{index}: not a JSON object ({error})"]
    if found != class_name:
        return [f"{index}: _class_name is {found!r}, expected {class_name!r} for this model.kind"]
    return []


def derived_sizes(cfg: Config) -> dict[str, Any]:
    """Sizes that follow from several keys, printed at the start of a run."""
    m, per_step = cfg.model, _per_step(cfg)
    token_px = m.patch_size if m.kind == "tiny_flux" else PIPELINE_TOKEN_PX  # model.patch_size is the tiny policy's
    tokens_per_image = (m.resolution // token_px) ** 2
    n_tasks = len(cfg.data.tasks)
    rl_samples = cfg.rl.prompts_per_epoch * cfg.rollout.group_size
    return {
        "train samples (posters x tasks)": cfg.data.n_train * n_tasks,
        "held-out samples": cfg.data.n_val * n_tasks,
        "reward-stage preference prompts (train + data.n_reward posters, x tasks)":
            (cfg.data.n_train + cfg.data.n_reward) * n_tasks,
        "eval prompts": cfg.rollout.eval_per_task * n_tasks,
        "image tokens per canvas": tokens_per_image,
        "max sequence (text + output + inputs)": m.text_encoder.max_length + tokens_per_image * (1 + m.max_inputs),
        "sft optimizer steps (local expert, global expert)": f"{cfg.sft.steps_for('local')}, "
                                                             f"{cfg.sft.steps_for('global')}",
        "sft gradient accumulation steps": cfg.sft.batch_size // per_step,
        "distill optimizer steps": cfg.distill.steps,
        "distill gradient accumulation steps": cfg.distill.batch_size // per_step,
        "reward_model optimizer steps": cfg.reward_model.steps,
        "reward_model pairs per rank per step": cfg.reward_model.batch_size // cfg.learner.num_ranks,
        "samples per rollout prompt group": cfg.rollout.group_size,
        "rl samples per epoch (prompts x group)": rl_samples,
        "rl optimizer steps per epoch (at least)": cfg.rl.passes * -(-rl_samples // cfg.rl.batch_size),
        "rl gradient accumulation steps": cfg.rl.batch_size // per_step,
        "CPUs requested by actors": cpus_requested(cfg),
    }
