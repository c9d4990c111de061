from pathlib import Path

import pytest
import yaml

from posterrl.config import STAGE_ORDER, ConfigError, apply_overrides, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "qwen_image_edit.yaml", "flux_kontext.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_yaml_validates(path):
    config = load_config(path)
    assert config.stages and all(s in STAGE_ORDER for s in config.stages)
    assert config.derived_sizes()["image tokens per canvas"] > 0


def test_tiny_default_is_runnable_here():
    assert load_config("configs/tiny.yaml").runnable_problems() == []


def test_gpu_presets_say_what_is_missing():
    problems = load_config("configs/flux_kontext.yaml").runnable_problems()
    assert any("model.kind='flux_kontext' is not available" in p for p in problems)


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_typo_key_names_path_and_suggests(tmp_path):
    path = _write(tmp_path, "learner:\n  lrr: 0.001\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "unknown key 'learner.lrr'" in msg
    assert "did you mean 'learner.lr'?" in msg
    assert str(path) in msg


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
    with pytest.raises(ConfigError, match=r"learner.lr: got 'fast', expected"):
        load_config(_write(tmp_path, "learner:\n  lr: fast\n"))


def test_cross_field_errors_explain_the_keys():
    with pytest.raises(ConfigError, match=r"learner.batch_size=10 must be a multiple of learner.num_ranks \* "
                                          r"learner.micro_batch_size = 2 \* 4 = 8"):
        load_config("configs/tiny.yaml", ["learner.batch_size=10"])
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


def test_overrides_apply_with_yaml_types():
    config = load_config("configs/tiny.yaml", ["learner.lr=1e-4", "rollout.group_size=8", "stages=[data]",
                                               "model.transformer.axes_dims_rope=[16,8,8]"])
    assert config.learner.lr == 1e-4
    assert config.rollout.group_size == 8
    assert config.stages == ["data"]
    assert config.model.transformer.axes_dims_rope == [16, 8, 8]


def test_override_typo_is_caught_like_a_file_typo():
    with pytest.raises(ConfigError, match=r"did you mean 'rollout.group_size'\?"):
        load_config("configs/tiny.yaml", ["rollout.group_sise=8"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        apply_overrides({}, ["learner.lr"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    config = load_config("configs/tiny.yaml", ["learner.lr=2e-4"])
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert load_config(path) == config
