import argparse
import warnings
from pathlib import Path
from typing import get_args

import pytest
import yaml

from posterrl import names
from posterrl.config import (
    LEGACY_KEYS,
    STAGE_ORDER,
    VALIDATORS,
    Config,
    ConfigDeprecationWarning,
    ConfigError,
    apply_overrides,
    load_config,
    validate_dict,
)
from posterrl.config.schema import DataConfig, ModelConfig, RolloutConfig, ScorerConfig

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "qwen_image_edit.yaml", "flux_kontext.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_validates(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigDeprecationWarning)  # the shipped configs use the current keys
        config = load_config(path)
    assert config.stages and all(s in STAGE_ORDER for s in config.stages)
    assert config.derived_sizes()["image tokens per canvas"] > 0


def test_tiny_default_is_runnable_here():
    assert load_config("configs/tiny.yaml").runnable_problems() == []


def test_gpu_presets_say_what_is_missing():
    problems = load_config("configs/flux_kontext.yaml").runnable_problems()
    assert not any("is not available" in p for p in problems)  # flux_kontext is built: only its path is missing
    assert any("model.pretrained_path='/models/FLUX.1-Kontext-dev': no such directory" in p
               and "posterrl model make-tiny --kind flux_kontext" in p for p in problems)
    problems = load_config("configs/qwen_image_edit.yaml").runnable_problems()
    assert not any("is not available" in p for p in problems)
    assert any("model.pretrained_path='/models/Qwen-Image-Edit': no such directory" in p for p in problems)


def test_gpus_a_local_cluster_lacks_are_said_before_anything_starts():
    import torch

    config = load_config("configs/tiny.yaml", ["rollout.gpus_per_actor=1"])
    problems = config.runnable_problems()
    if torch.cuda.device_count() >= 2:
        assert not any("GPUs" in p for p in problems)
    else:
        assert any(p.startswith("the actors ask for 2 GPUs") and f"this machine has {torch.cuda.device_count()}" in p
                   for p in problems)
    assert not any("GPUs" in p for p in config.runnable_problems(address="10.0.0.1:6379"))  # a cluster decides


def test_a_pretrained_path_of_another_pipeline_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    config = load_config("configs/flux_kontext_tiny.yaml", [f"model.pretrained_path={folder}"])
    assert any("no model_index.json" in p for p in config.runnable_problems())
    (folder / "model_index.json").write_text('{"_class_name": "QwenImageEditPipeline"}')
    assert any("_class_name is 'QwenImageEditPipeline', expected 'FluxKontextPipeline'" in p
               for p in config.runnable_problems())


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_typo_key_names_path_and_suggests(tmp_path):
    path = _write(tmp_path, "sft:\n  lrr: 0.001\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "unknown key 'sft.lrr'" in msg
    assert "did you mean 'sft.lr'?" in msg
    assert str(path) in msg


def test_typo_of_a_moved_key_points_to_its_new_place(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'learner.sft_step'; did you mean 'sft.steps'\? "
                                          r"\(learner.sft_steps moved to sft.steps\)"):
        load_config(_write(tmp_path, "learner:\n  sft_step: 3\n"))


def test_typo_section_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'rollut'; did you mean 'rollout'\?"):
        load_config(_write(tmp_path, "rollut:\n  group_size: 4\n"))


def test_bad_value_names_key_value_and_expectation(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "rollout:\n  group_size: 0\n  solver: rk4\n"))
    msg = str(err.value)
    assert "rollout.group_size: got 0, expected a number >= 1" in msg
    assert "rollout.solver: got 'rk4', expected one of 'euler' or 'heun'" in msg


def test_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"sft.lr: got 'fast', expected"):
        load_config(_write(tmp_path, "sft:\n  lr: fast\n"))


def test_cross_field_errors_explain_the_keys():
    with pytest.raises(ConfigError, match=r"sft.batch_size=10 must be a multiple of learner.num_ranks \* "
                                          r"learner.micro_batch_size = 2 \* 4 = 8"):
        load_config("configs/tiny.yaml", ["sft.batch_size=10"])
    with pytest.raises(ConfigError, match=r"model.resolution=60 must be a multiple of model.patch_size=8"):
        load_config("configs/tiny.yaml", ["model.resolution=60", "model.patch_size=8"])
    with pytest.raises(ConfigError, match="would wait forever"):
        load_config("configs/tiny.yaml", ["cluster.num_cpus=1"])
    with pytest.raises(ConfigError, match="pipeline order"):
        load_config("configs/tiny.yaml", ["stages=[eval,data]"])
    with pytest.raises(ConfigError, match="needs at least 2"):
        load_config("configs/tiny.yaml", ["stages=[data,rl]", "rollout.group_size=1"])
    with pytest.raises(ConfigError, match="data.n_reward=10 generates reward-stage posters, but data.train_manifest"):
        load_config("configs/tiny.yaml", ["data.n_reward=10", "data.train_manifest=x.jsonl"])
    with pytest.raises(ConfigError, match="model.input_detail=true adds the input's detail .* set model.residual"):
        load_config("configs/tiny.yaml", ["model.input_detail=true", "model.residual=false"])


def test_stage_sections_cross_field_errors():
    with pytest.raises(ConfigError, match=r"distill.batch_size=6 must be a multiple of learner.num_ranks \* "
                                          r"learner.micro_batch_size = 2 \* 4 = 8"):
        load_config("configs/tiny.yaml", ["distill.batch_size=6"])
    with pytest.raises(ConfigError, match=r"reward_model.batch_size=33 must be a multiple of learner.num_ranks=2"):
        load_config("configs/tiny.yaml", ["reward_model.batch_size=33"])
    with pytest.raises(ConfigError, match=r"reward_model.backbone=vlm needs reward_model.vlm_path"):
        load_config("configs/tiny.yaml", ["reward_model.backbone=vlm", "reward_model.augment=false"])
    with pytest.raises(ConfigError, match=r"reward_model.augment=true applies to the conv backbone only"):
        load_config("configs/tiny.yaml", ["reward_model.backbone=vlm", "reward_model.vlm_path=/x"])
    with pytest.raises(ConfigError, match=r"use reward_model.preference_manifest"):
        load_config("configs/tiny.yaml", ["data.n_reward=10", "data.train_manifest=x.jsonl"])
    # A stage's batch is checked only when the stage runs.
    config = load_config("configs/tiny.yaml", ["stages=[data,eval]", "sft.batch_size=10", "distill.batch_size=6",
                                               "reward_model.batch_size=33"])
    assert (config.sft.batch_size, config.distill.batch_size, config.reward_model.batch_size) == (10, 6, 33)


def test_stage_sections_have_their_defaults():
    config = Config()
    assert config.sft.model_dump() == {"steps": 200, "local_steps": None, "global_steps": None, "lr": 3e-4,
                                       "batch_size": 8, "eval_every": 100, "checkpoint_every": 100}
    assert config.distill.model_dump() == {"steps": 200, "lr": 3e-4, "batch_size": 8, "lambda_expert": 1.0,
                                           "init": "local", "eval_every": 100, "checkpoint_every": 100}
    assert set(config.learner.model_dump()) == {"num_ranks", "cpus_per_rank", "gpus_per_rank", "micro_batch_size",
                                                "weight_decay", "warmup_steps", "grad_clip", "keep_checkpoints",
                                                "seed", "resources"}
    assert config.reward_model.steps == 400 and config.reward_model.backbone == "conv"
    assert "bt" not in config.reward.model_dump()


def test_every_validator_returns_messages():
    config = load_config("configs/tiny.yaml")
    for validator in VALIDATORS:
        assert validator(config) == []


def test_overrides_apply_with_yaml_types():
    config = load_config("configs/tiny.yaml", ["sft.lr=1e-4", "rollout.group_size=8", "stages=[data]",
                                               "model.transformer.axes_dims_rope=[16,8,8]"])
    assert config.sft.lr == 1e-4
    assert config.rollout.group_size == 8
    assert config.stages == ["data"]
    assert config.model.transformer.axes_dims_rope == [16, 8, 8]


def test_override_typo_is_caught_like_a_file_typo():
    with pytest.raises(ConfigError, match=r"did you mean 'rollout.group_size'\?"):
        load_config("configs/tiny.yaml", ["rollout.group_sise=8"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        apply_overrides({}, ["sft.lr"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = load_config("configs/tiny.yaml", ["sft.lr=2e-4"])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(path) == config


# ---------------------------------------------------------------- keys that moved

LEGACY_YAML = """\
learner:
  num_ranks: 2
  micro_batch_size: 4
  lr: 1.0e-3
  batch_size: 16
  sft_steps: 600
  distill_steps: 500
  lambda_expert: 0.5
  distill_init: global
  eval_every: 200
  checkpoint_every: 50
reward:
  scorers: [{name: bt, kind: bradley_terry}]
  bt:
    steps: 700
    channels: 16
"""


def test_legacy_keys_in_a_file_are_migrated_with_a_note(tmp_path):
    path = _write(tmp_path, LEGACY_YAML)
    with pytest.warns(ConfigDeprecationWarning) as caught:
        config = load_config(path)
    notes = [str(w.message) for w in caught]
    assert f"{path}: learner.sft_steps is deprecated, use sft.steps (migrated)" in notes
    assert f"{path}: learner.lr is deprecated, use sft.lr and distill.lr (migrated)" in notes
    assert f"{path}: reward.bt is deprecated, use reward_model (migrated)" in notes
    assert len(notes) == len(LEGACY_KEYS)  # one note per moved key
    assert issubclass(ConfigDeprecationWarning, FutureWarning)  # shown by default outside the CLI too
    assert (config.sft.steps, config.sft.lr, config.sft.batch_size) == (600, 1e-3, 16)
    assert (config.sft.eval_every, config.sft.checkpoint_every) == (200, 50)
    assert (config.distill.steps, config.distill.lr, config.distill.batch_size) == (500, 1e-3, 16)
    assert (config.distill.lambda_expert, config.distill.init) == (0.5, "global")
    assert (config.distill.eval_every, config.distill.checkpoint_every) == (200, 50)
    assert (config.reward_model.steps, config.reward_model.channels) == (700, 16)


def test_legacy_overrides_are_migrated_with_a_note():
    with pytest.warns(ConfigDeprecationWarning, match=r"override learner.lr=1e-4: learner.lr is deprecated, "
                                                      r"use sft.lr and distill.lr \(migrated\)"):
        config = load_config("configs/tiny.yaml", ["learner.lr=1e-4"])
    assert config.sft.lr == config.distill.lr == 1e-4
    with pytest.warns(ConfigDeprecationWarning) as caught:
        config = load_config("configs/tiny.yaml", ["reward.bt.steps=7", "learner.sft_steps=3"])
    assert [str(w.message) for w in caught] == [
        "override reward.bt.steps=7: reward.bt.steps is deprecated, use reward_model.steps (migrated)",
        "override learner.sft_steps=3: learner.sft_steps is deprecated, use sft.steps (migrated)"]
    assert (config.reward_model.steps, config.sft.steps) == (7, 3)
    # The migrated config is the one written with the new keys.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigDeprecationWarning)
        legacy = load_config("configs/tiny.yaml", ["learner.batch_size=16", "learner.eval_every=4"])
    assert legacy == load_config("configs/tiny.yaml", ["sft.batch_size=16", "distill.batch_size=16",
                                                       "sft.eval_every=4", "distill.eval_every=4"])


def test_legacy_override_of_a_migrated_file_wins(tmp_path):
    with pytest.warns(ConfigDeprecationWarning):
        config = load_config(_write(tmp_path, LEGACY_YAML), ["learner.lr=5e-4", "sft.steps=9"])
    assert (config.sft.lr, config.distill.lr, config.sft.steps) == (5e-4, 5e-4, 9)


def test_old_and_new_key_that_disagree_are_an_error(tmp_path):
    both = _write(tmp_path, "learner:\n  sft_steps: 600\nsft:\n  steps: 300\n")
    with pytest.raises(ConfigError) as err:
        load_config(both)
    assert str(both) in str(err.value)
    assert "learner.sft_steps=600 and sft.steps=300 disagree" in str(err.value)
    with pytest.raises(ConfigError, match=r"reward.bt.steps=700 and reward_model.steps=5 disagree"):
        validate_dict({"reward": {"bt": {"steps": 700}}, "reward_model": {"steps": 5}})
    with pytest.raises(ConfigError, match=r"overrides learner.lr=1e-4 and sft.lr=2e-4 disagree"):
        load_config("configs/tiny.yaml", ["learner.lr=1e-4", "sft.lr=2e-4"])
    # The same value under both is no conflict.
    with pytest.warns(ConfigDeprecationWarning):
        config = load_config(_write(tmp_path, "learner:\n  sft_steps: 300\nsft:\n  steps: 300\n"))
    assert config.sft.steps == 300
    with pytest.warns(ConfigDeprecationWarning):
        assert load_config("configs/tiny.yaml", ["learner.lr=1e-4", "sft.lr=1e-4"]).sft.lr == 1e-4


def test_cli_shows_each_migration_note(capsys):
    from posterrl.cli import main

    assert main(["config", "configs/tiny.yaml", "learner.lr=1e-4"]) == 0
    out = capsys.readouterr().out
    assert out.count("learner.lr is deprecated, use sft.lr and distill.lr (migrated)") == 1
    assert "valid" in out


# ---------------------------------------------------------------- closed lists, defined once


def _literal(model, field):
    return get_args(model.model_fields[field].annotation)


def test_closed_lists_are_the_configs_choices():
    from posterrl.cli import build_parser
    from posterrl.data.tasks import TASKS
    from reward_server.registry import KINDS
    from rollout.sampler import SOLVERS

    assert TASKS == names.TASKS == get_args(get_args(DataConfig.model_fields["tasks"].annotation)[0])
    assert DataConfig().tasks == list(TASKS)
    assert STAGE_ORDER == names.STAGE_ORDER == get_args(get_args(Config.model_fields["stages"].annotation)[0])
    assert KINDS == names.SCORER_KINDS == _literal(ScorerConfig, "kind")
    assert names.MODEL_KINDS == _literal(ModelConfig, "kind")
    assert names.SOLVER_NAMES == _literal(RolloutConfig, "solver") == tuple(SOLVERS)
    assert names.JUDGE_BACKENDS == get_args(_literal(ScorerConfig, "backend")[0])  # Optional[Literal[...]]

    def choices(*path):
        parser = build_parser()
        for name in path:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = sub.choices[name]
        return {a.dest: a.choices for a in parser._actions if a.choices is not None and a.dest != "command"}

    assert tuple(choices("reward", "add")["kind"]) == names.SCORER_KINDS
    assert tuple(choices("reward", "add")["backend"]) == names.JUDGE_BACKENDS
    assert tuple(choices("reward", "swap")["backend"]) == names.JUDGE_BACKENDS
    assert tuple(choices("sample")["solver"]) == names.SOLVER_NAMES
    assert tuple(choices("model", "make-tiny")["kind"]) == names.PIPELINE_MODEL_KINDS


# ---------------------------------------------------------------- values no run can use


def _float_keys():
    """Every float field of every section (nested sections and the scorer list included), as a dotted key."""
    import typing

    from pydantic import BaseModel

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            args = typing.get_args(field.annotation)
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from walk(field.annotation, f"{prefix}{name}.")
            elif args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
                yield from walk(args[0], f"{prefix}{name}[0].")
            elif typing.get_origin(field.annotation) is dict:
                yield f"{prefix}{name}.some_key"  # a mapping's values (resources)
            elif field.annotation is float or float in args:
                yield prefix + name

    return list(walk(Config, ""))


FLOAT_KEYS = _float_keys()


def test_every_section_has_float_keys_to_check():
    sections = {key.split(".")[0] for key in FLOAT_KEYS}
    assert {"data", "rollout", "reward", "reward_model", "sft", "distill", "rl", "learner", "cluster"} <= sections
    assert "reward.scorers[0].weight" in FLOAT_KEYS and "rl.retire_threshold" in FLOAT_KEYS


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_floats_are_rejected_with_the_key(key, value):
    with pytest.raises(ConfigError) as error:
        load_config("configs/tiny.yaml", [f"{key}={value}"])
    assert f"{key}: got " in str(error.value) and "expected a finite number" in str(error.value)


def test_non_finite_float_in_a_file_names_file_and_key(tmp_path):
    path = _write(tmp_path, "reward:\n  scorers: [{name: bt, kind: bradley_terry, weight: .nan}]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: reward.scorers\[0\].weight: got nan, expected a finite number"):
        load_config(path)


def test_resolution_has_an_upper_bound():
    assert load_config("configs/tiny.yaml", ["model.resolution=2048", "data.size=2048"]).model.resolution == 2048
    with pytest.raises(ConfigError, match=r"model.resolution: got 4096, expected a number <= 2048"):
        load_config("configs/tiny.yaml", ["model.resolution=4096"])


@pytest.mark.parametrize("name", ["", "a/b", "a b", "../x", "bt:1"])
def test_scorer_names_must_be_plain(name):
    with pytest.raises(ConfigError, match=r"reward.scorers\[0\] .*: name .*expected a non-empty name of letters"):
        validate_dict({"reward": {"scorers": [{"name": name, "kind": "preservation"}]}})
    assert validate_dict({"reward": {"scorers": [{"name": "bt-v2.1_x", "kind": "preservation"}]}})


@pytest.mark.parametrize("url", ["file:///etc/passwd", "127.0.0.1:8000/v1", "http://", "ftp://host/v1"])
def test_judge_url_must_be_http(url):
    scorer = {"name": "j", "kind": "vlm_judge", "backend": "openai", "path": "m", "url": url}
    with pytest.raises(ConfigError, match=r"reward.scorers\[0\] \('j'\): url .*expected an http:// or https:// URL"):
        validate_dict({"reward": {"scorers": [scorer]}})
    assert validate_dict({"reward": {"scorers": [{**scorer, "url": "https://judge.example:8000/v1"}]}})


@pytest.mark.parametrize("scorer, message", [
    ({"kind": "preservation", "url": "http://x"}, "url does not apply to kind preservation"),
    ({"kind": "ocr_title", "path": "m"}, "path does not apply to kind ocr_title"),
    ({"kind": "bradley_terry", "backend": "vllm"}, "backend does not apply to kind bradley_terry"),
    ({"kind": "vlm_judge", "path": "m"}, "kind vlm_judge needs backend"),
    ({"kind": "vlm_judge", "path": "m", "backend": "openai"}, "backend openai needs url"),
])
def test_options_a_scorer_kind_does_not_take(scorer, message):
    with pytest.raises(ConfigError, match=message):
        validate_dict({"reward": {"scorers": [{"name": "s", **scorer}]}})


def test_overrides_reach_list_entries():
    config = load_config("configs/tiny.yaml", ["reward.scorers[0].weight=0.5", "reward.scorers.0.name=bt2"])
    assert (config.reward.scorers[0].weight, config.reward.scorers[0].name) == (0.5, "bt2")
    with pytest.raises(ConfigError, match=r"reward.scorers has 1 entries"):
        load_config("configs/tiny.yaml", ["reward.scorers[1].weight=1"])
    with pytest.raises(ConfigError, match=r"indexes sft.lr, which is not a list"):
        load_config("configs/tiny.yaml", ["sft.lr[0]=1"])
    with pytest.raises(ConfigError, match="malformed key path"):
        load_config("configs/tiny.yaml", ["reward.scorers[x].weight=1"])


def test_data_max_bad_fraction():
    assert Config().data.max_bad_fraction == 0.1
    with pytest.raises(ConfigError, match=r"data.max_bad_fraction: got 1.5, expected a number <= 1"):
        load_config("configs/tiny.yaml", ["data.max_bad_fraction=1.5"])


def test_zero_stage_3_needs_lora_on_a_released_model():
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage=3 needs LoRA on a released model "
                                          r"\(model.kind='tiny_flux', model.lora.rank=0\)"):
        load_config("configs/tiny.yaml", ["deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"model.lora.rank=0\)"):
        load_config("configs/flux_kontext_tiny.yaml", ["deepspeed.zero_stage=3", "model.lora.rank=0"])
    assert load_config("configs/flux_kontext_tiny.yaml", ["deepspeed.zero_stage=3"]).deepspeed.zero_stage == 3


def test_sft_steps_per_regime_default_to_steps():
    config = load_config("configs/tiny.yaml", ["sft.steps=7", "sft.global_steps=3"])
    assert (config.sft.steps_for("local"), config.sft.steps_for("global")) == (4800, 3)  # tiny.yaml sets local
    config = load_config("configs/tiny.yaml", ["sft.steps=7", "sft.local_steps=null"])
    assert (config.sft.steps_for("local"), config.sft.steps_for("global")) == (7, 7)
    with pytest.raises(ConfigError, match="sft.local_steps"):
        load_config("configs/tiny.yaml", ["sft.local_steps=0"])


def test_the_base_kl_reference_needs_a_released_model():
    with pytest.raises(ConfigError, match=r"rl.kl_reference=base needs a released model"):
        load_config("configs/tiny.yaml", ["rl.kl_reference=base"])
    assert load_config("configs/flux_kontext_tiny.yaml", ["rl.kl_reference=base"]).rl.kl_reference == "base"
