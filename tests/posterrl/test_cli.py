"""The data and config commands, driven through the real entry point in-process."""

import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from posterrl.cli import main, parse_args
from posterrl.data.manifest import load_manifest
from posterrl.data.tasks import TASKS


def test_data_generate_then_show(tmp_path, capsys):
    assert main(["data", "generate", "--out", str(tmp_path / "d"), "--n", "2", "--seed", "4", "--size", "48"]) == 0
    rows = load_manifest(tmp_path / "d" / "manifest.jsonl", require_target=True).rows
    assert len(rows) == 2 * len(TASKS)
    assert max(rows[0].load_target().size) == 48
    assert main(["data", "show", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "identity-driven: 2" in out and "total: 12" in out
    with Image.open(tmp_path / "d" / "contact_sheet.png") as sheet:
        assert sheet.width > 0


def test_data_generate_rejects_unknown_task(tmp_path, capsys):
    assert main(["data", "generate", "--out", str(tmp_path), "--n", "1", "--tasks", "filing"]) == 2
    assert "--tasks ['filing']" in capsys.readouterr().out


def test_data_show_reports_bad_rows(tmp_path, capsys):
    main(["data", "generate", "--out", str(tmp_path), "--n", "1", "--tasks", "filling"])
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + '{"id": "x", "task": "filling"}\n')
    assert main(["data", "show", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 of 2 rows" in out and "total: 1" in out


def test_config_command_validates_and_prints_sizes(capsys):
    assert main(["config", "configs/tiny.yaml", "rollout.group_size=6"]) == 0
    out = capsys.readouterr().out
    assert "group_size: 6" in out and "image tokens per canvas: 64" in out and "valid" in out
    assert main(["config", "configs/tiny.yaml", "rollout.gruop_size=6"]) == 2
    assert "did you mean 'rollout.group_size'?" in capsys.readouterr().out


def test_sample_needs_a_source():
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", "x", "--out", "y"])


# ---------------------------------------------------------------- overrides anywhere after the subcommand

# Each command line the README (Commands) and docs/reward_model.md show with overrides, the overrides placed
# where the docs put them and elsewhere: (argv, what the namespace holds). No stage is run.
OVERRIDE_LINES = [
    # README: posterrl run CONFIG [key=value ...] [--run-dir DIR] [--address RAY_ADDRESS] [--resume]
    ("run c.yaml sft.lr=1e-4 --run-dir runs/x --address auto --resume",
     dict(command="run", config="c.yaml", overrides=["sft.lr=1e-4"], run_dir=Path("runs/x"), address="auto",
          resume=True)),
    ("run c.yaml --run-dir runs/x sft.lr=1e-4 --resume rollout.group_size=8",
     dict(command="run", config="c.yaml", overrides=["sft.lr=1e-4", "rollout.group_size=8"], run_dir=Path("runs/x"),
          resume=True)),
    # README: posterrl run configs/tiny.yaml sft.lr=1e-4 rollout.group_size=8
    ("run configs/tiny.yaml sft.lr=1e-4 rollout.group_size=8",
     dict(command="run", config="configs/tiny.yaml", overrides=["sft.lr=1e-4", "rollout.group_size=8"],
          run_dir=None, resume=False)),
    # README: posterrl rl configs/tiny.yaml --run-dir runs/x rl.epochs=10 --resume
    ("rl configs/tiny.yaml --run-dir runs/x rl.epochs=10 --resume",
     dict(command="rl", config="configs/tiny.yaml", overrides=["rl.epochs=10"], run_dir=Path("runs/x"), resume=True)),
    # README: posterrl sft CONFIG [key=value ...] [--run-dir DIR] [--resume]
    ("sft c.yaml sft.steps=3 --run-dir runs/x --resume",
     dict(command="sft", config="c.yaml", overrides=["sft.steps=3"], run_dir=Path("runs/x"), resume=True)),
    ("sft c.yaml --run-dir runs/x sft.steps=3",
     dict(command="sft", config="c.yaml", overrides=["sft.steps=3"], run_dir=Path("runs/x"), resume=False)),
    # README: posterrl distill CONFIG --run-dir DIR [key=value ...] [--resume]
    ("distill c.yaml --run-dir runs/x distill.steps=3 --resume",
     dict(command="distill", config="c.yaml", overrides=["distill.steps=3"], run_dir=Path("runs/x"), resume=True)),
    # README: posterrl rl CONFIG --run-dir DIR [key=value ...] [--resume]
    ("rl c.yaml --run-dir runs/x rl.epochs=2 rl.mode=off_policy --resume",
     dict(command="rl", config="c.yaml", overrides=["rl.epochs=2", "rl.mode=off_policy"], run_dir=Path("runs/x"),
          resume=True)),
    ("rl rl.epochs=2 --run-dir runs/x c.yaml",  # an override even before CONFIG
     dict(command="rl", config="c.yaml", overrides=["rl.epochs=2"], run_dir=Path("runs/x"))),
    # README: posterrl reward train CONFIG --run-dir DIR [key=value ...]
    ("reward train c.yaml --run-dir runs/x reward_model.steps=5",
     dict(command="reward", reward_command="train", config="c.yaml", overrides=["reward_model.steps=5"],
          run_dir=Path("runs/x"))),
    # docs/reward_model.md: posterrl reward train configs/tiny.yaml data.n_reward=400 ... (then --run-dir)
    ("reward train configs/tiny.yaml data.n_reward=400 reward_model.difference_channels=true "
     "reward_model.steps=1500 reward_model.batch_size=64 reward_model.eval_every=250 --run-dir runs/tiny",
     dict(command="reward", reward_command="train", config="configs/tiny.yaml",
          overrides=["data.n_reward=400", "reward_model.difference_channels=true", "reward_model.steps=1500",
                     "reward_model.batch_size=64", "reward_model.eval_every=250"], run_dir=Path("runs/tiny"))),
    # README: posterrl config CONFIG [key=value ...]
    ("config c.yaml rollout.group_size=6 'rl.retire_threshold=0.9'",
     dict(command="config", config="c.yaml", overrides=["rollout.group_size=6", "rl.retire_threshold=0.9"])),
]


@pytest.mark.parametrize("line, expected", OVERRIDE_LINES, ids=[line for line, _ in OVERRIDE_LINES])
def test_overrides_parse_anywhere_after_the_subcommand(line, expected):
    args = parse_args(shlex.split(line))
    for key, value in expected.items():
        assert getattr(args, key) == value, (key, getattr(args, key))


def _documented_command_lines() -> list[str]:
    """Every `posterrl ...` span with an override in README.md and docs/*.md (a span may wrap lines)."""
    root = Path(__file__).parents[2]
    spans = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        spans += [" ".join(m.split()) for m in re.findall(r"`(posterrl [^`]*)`", doc.read_text()) if "=" in m]
    return spans


@pytest.mark.parametrize("line", _documented_command_lines())
def test_documented_command_lines_parse(line):
    argv = shlex.split(line)[1:]
    args = parse_args(argv)
    assert args.config.endswith(".yaml")
    assert args.overrides == [a for a in argv if "=" in a and not a.startswith("-")]


@pytest.mark.parametrize("line, message", [
    ("rl c.yaml --run-dir runs/x --bogus", "unrecognized arguments: --bogus"),
    ("rl c.yaml --run-dir runs/x -x=1", "unrecognized arguments: -x=1"),
    ("data generate --out d --n 1 sft.lr=1", "unrecognized arguments: sft.lr=1; key=value overrides go with"),
    ("sample --checkpoint c --task filling --out o rollout.num_steps=2", "unrecognized arguments: rollout.num_steps=2"),
    ("reward list --run r a=1", "unrecognized arguments: a=1"),
    ("config a=1 b=2", "expected CONFIG"),
])
def test_unknown_arguments_are_still_errors(line, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(shlex.split(line))
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_overrides_after_options_reach_the_config(capsys):
    assert main(["config", "configs/tiny.yaml", "rollout.group_size=6"]) == 0
    before = capsys.readouterr().out
    assert main(["config", "rollout.group_size=6", "configs/tiny.yaml"]) == 0
    assert capsys.readouterr().out == before


def test_reward_add_optional_flag():
    assert parse_args(shlex.split("reward add --run r --name p --kind preservation --optional")).optional is True
    assert parse_args(shlex.split("reward add --run r --name p --kind preservation")).optional is False


def test_reward_list_shows_every_failure_kind():
    from rich.console import Console

    from actors.reward_cli import print_registry  # imports ray; starts nothing
    from reward_server.registry import FAILURE_KINDS

    scorer = {"name": "bt", "kind": "bradley_terry", "weight": 1.0, "status": "live", "version": 2, "path": "/m",
              "backend": None, "url": None, "fingerprint": "abc", "optional": True}
    console = Console(record=True, width=200)
    print_registry(console, {"step": 3, "scorers": [scorer], "restore_problems": ["scorer 'j' failed to load"],
                             "stats": {"requests": 1, "samples": 2, "batches": 1, "mean_batch_size": 2.0},
                             "failures": {"bt": {kind: i + 1 for i, kind in enumerate(FAILURE_KINDS)}}})
    text = console.export_text()
    assert "bt: dropped scores: timeout 1, error 2, nonfinite 3, wrong_length 4, out_of_range 5" in text
    assert "live, optional" in text and "not restored from the journal: scorer 'j' failed to load" in text
