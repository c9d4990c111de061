"""Bad input through the real entry point, in-process: exit code 2, a message naming the option, key, file or
row, no traceback, and nothing started (no Ray: `actors.reward_cli` is made unimportable, so a command that
would join a cluster fails the test instead).

Plus the run files the CLI and the stages read (cluster.json, latest.json), through their readers.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image

from posterrl.checkpoints import LATEST_FILE, CheckpointError, latest_checkpoint, read_latest
from posterrl.cli import main
from posterrl.errors import UserError
from posterrl.runlog import CLUSTER_FILE, read_cluster_file

TINY = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")


def _row(id_: str, **fields) -> dict:
    row = {"id": id_, "task": "rescaling", "instruction": "Re-lay it out.", "inputs": ["a.png"], "target": "a.png",
           "meta": {}}
    row.update(fields)
    return row


def _manifest(tmp_path: Path, rows: list[dict], name: str = "manifest.jsonl") -> str:
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "a.png")
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


def _checkpoint(tmp_path: Path, max_inputs: int = 3) -> str:
    """An exported policy's spec file alone: enough for `sample` to check its input before loading weights."""
    from posterrl.policy import SPEC_FILE, PolicySpec

    directory = tmp_path / "policy"
    directory.mkdir()
    spec = asdict(PolicySpec(kind="tiny_flux", resolution=32, patch_size=4, max_text_length=96, max_inputs=max_inputs))
    (directory / SPEC_FILE).write_text(json.dumps(spec))
    return str(directory)


def _run_dir(tmp_path: Path, cluster: str | None) -> str:
    run = tmp_path / "run"
    run.mkdir()
    if cluster is not None:
        (run / CLUSTER_FILE).write_text(cluster)
    return str(run)


def _unwritable(tmp_path: Path) -> str:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not _writable(locked):
        return str(locked / "out")
    # root ignores modes: /proc refuses new files for everyone on Linux (CI's and these machines' OS)
    assert not _writable(Path("/proc")), "expected /proc to refuse writes"
    return "/proc/posterrl-test-out"


def _writable(directory: Path) -> bool:
    try:
        (directory / ".probe").mkdir()
    except OSError:
        return False
    (directory / ".probe").rmdir()
    return True


# Each case: argv built from tmp_path, then the strings the message must hold.
CASES = {
    "generate --n 0": (lambda t: ["data", "generate", "--out", str(t / "d"), "--n", "0"], ["--n 0", ">= 1"]),
    "generate --n -1": (lambda t: ["data", "generate", "--out", str(t / "d"), "--n", "-1"], ["--n -1"]),
    "generate --size 0": (lambda t: ["data", "generate", "--out", str(t / "d"), "--n", "1", "--size", "0"],
                          ["--size 0", "32", "2048"]),
    "generate --size 3": (lambda t: ["data", "generate", "--out", str(t / "d"), "--n", "1", "--size", "3"],
                          ["--size 3", "32", "2048", "data.size"]),
    "generate --out under a file": (
        lambda t: (t / "file").write_text("x") and ["data", "generate", "--out", str(t / "file" / "d"), "--n", "1"],
        ["--out", "file is a file"]),
    "generate --out unwritable": (lambda t: ["data", "generate", "--out", _unwritable(t), "--n", "1"],
                                  ["--out", "cannot write"]),
    "generate --split outside --out": (
        lambda t: ["data", "generate", "--out", str(t / "d"), "--n", "1", "--split", "../../x"],
        ["--split '../../x'", "plain name"]),
    "generate takes no overrides": (lambda t: ["data", "generate", "--out", str(t / "d"), "--n", "1", "sft.lr=1"],
                                    ["unrecognized arguments: sft.lr=1"]),
    "show --out under a file": (
        lambda t: (t / "file").write_text("x") and ["data", "show", _manifest(t, [_row("r")]), "--out",
                                                    str(t / "file" / "sheet.png")],
        ["--out", "file is a file"]),
    "show non-UTF-8 manifest": (
        lambda t: (t / "m.jsonl").write_bytes(json.dumps(_row("r")).encode() + b"\n\xff\xfe\n") and
        ["data", "show", str(t / "m.jsonl")],
        ["m.jsonl line 2", "not UTF-8"]),
    "show manifest of bad target_aspect rows": (
        lambda t: ["data", "show", _manifest(t, [_row("zero", meta={"target_aspect": [0, 0]}),
                                                 _row("wide", meta={"target_aspect": "wide"})])],
        ["no usable row", "line 1 (id 'zero')", "target_aspect", "line 2 (id 'wide')"]),
    "show manifest of a decompression bomb": (
        lambda t: ["data", "show", _manifest(t, [_row("bomb", inputs=["bomb.png"])])],
        ["id 'bomb'", "bomb.png", "too large"]),
    "config weight .nan": (lambda t: ["config", TINY, "reward.scorers[0].weight=.nan"],
                           ["reward.scorers[0].weight", "finite"]),
    "config adv_max .inf": (lambda t: ["config", TINY, "rl.adv_max=.inf"], ["rl.adv_max", "finite"]),
    "config file with .nan": (lambda t: ["config", _yaml(t, "sft:\n  lr: .nan\n")], ["bad.yaml", "sft.lr", "finite"]),
    "config resolution": (lambda t: ["config", TINY, "model.resolution=20480"], ["model.resolution", "<= 2048"]),
    "config empty scorer name": (
        lambda t: ["config", _yaml(t, "reward:\n  scorers: [{name: '', kind: preservation}]\n")],
        ["reward.scorers[0]", "name ''"]),
    "config scorer name with a slash": (lambda t: ["config", TINY, "reward.scorers[0].name=a/b"],
                                        ["reward.scorers[0]", "name 'a/b'"]),
    "config judge url file://": (
        lambda t: ["config", _yaml(t, "reward:\n  scorers: [{name: j, kind: vlm_judge, backend: openai, path: m, "
                                      "url: 'file:///etc/passwd'}]\n")],
        ["reward.scorers[0]", "url 'file:///etc/passwd'", "http"]),
    "config unknown option": (lambda t: ["config", TINY, "--bogus"], ["unrecognized arguments: --bogus"]),
    "reward add --url for preservation": (
        lambda t: ["reward", "add", "--run", _run_dir(t, None), "--name", "p", "--kind", "preservation",
                   "--url", "http://x"],
        ["--url", "preservation"]),
    "reward add --backend for bradley_terry": (
        lambda t: ["reward", "add", "--run", _run_dir(t, None), "--name", "b", "--kind", "bradley_terry",
                   "--path", "m", "--backend", "vllm"],
        ["--backend", "bradley_terry"]),
    "reward add judge url file://": (
        lambda t: ["reward", "add", "--run", _run_dir(t, None), "--name", "j", "--kind", "vlm_judge",
                   "--backend", "openai", "--path", "m", "--url", "file:///etc/passwd"],
        ["--url 'file:///etc/passwd'"]),
    "reward add name with a slash": (
        lambda t: ["reward", "add", "--run", _run_dir(t, None), "--name", "a/b", "--kind", "preservation"],
        ["--name 'a/b'"]),
    "reward add weight nan": (
        lambda t: ["reward", "add", "--run", _run_dir(t, None), "--name", "p", "--kind", "preservation",
                   "--weight", "nan"],
        ["--weight nan", "finite"]),
    "reward swap judge url file://": (
        lambda t: ["reward", "swap", "--run", _run_dir(t, None), "--name", "j", "--url", "file:///etc/passwd"],
        ["posterrl reward swap", "--url 'file:///etc/passwd'"]),
    "reward set-weight inf": (
        lambda t: ["reward", "set-weight", "--run", _run_dir(t, None), "--name", "bt", "--weight", "inf"],
        ["posterrl reward set-weight", "--weight inf"]),
    "reward remove of no run": (lambda t: ["reward", "remove", "--run", str(t / "nowhere"), "--name", "bt"],
                                ["--run", "nowhere", "no such run directory"]),
    "reward list torn cluster.json": (lambda t: ["reward", "list", "--run", _run_dir(t, '{"address": "1.2')],
                                      ["cluster.json", "torn", "may not be running"]),
    "reward list empty cluster.json": (lambda t: ["reward", "list", "--run", _run_dir(t, "")],
                                       ["cluster.json", "may not be running"]),
    "sample non-UTF-8 manifest": (
        lambda t: (t / "m.jsonl").write_bytes(b"\xff\xfe{}\n") and
        ["sample", "--checkpoint", _checkpoint(t), "--manifest", str(t / "m.jsonl"), "--out", str(t / "o")],
        ["m.jsonl line 1", "not UTF-8"]),
    "sample rows with too many inputs": (
        lambda t: ["sample", "--checkpoint", _checkpoint(t, max_inputs=1), "--manifest",
                   _manifest(t, [_row("two", inputs=["a.png", "a.png"])]), "--out", str(t / "o")],
        ["id 'two'", "model.max_inputs=1"]),
}


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "actors.reward_cli", None)  # importing it now raises ImportError


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_naming_what_is_wrong(case, tmp_path, capsys, no_ray, bomb_png):
    bomb_png(tmp_path / "bomb.png")  # for the rows that name it
    make_argv, expected = CASES[case]
    argv = make_argv(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors (usage, unknown arguments)
        code = exit_.code
    out, err = capsys.readouterr()
    text = out + err
    assert code == 2, text
    assert "Traceback" not in text
    for part in expected:
        assert part in text, f"{part!r} not in {text!r}"


def test_generate_split_writes_nothing_outside_out(tmp_path, capsys):
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert main(["data", "generate", "--out", str(tmp_path / "a" / "b" / "d"), "--n", "1", "--split", "../../x"]) == 2
    assert [p.name for p in tmp_path.rglob("*")] == ["a", "b"]


# ---------------------------------------------------------------- run files, through their readers


@pytest.mark.parametrize("text", ["", '{"address": "10.0.0.1:63', "[]", '{"namespace": "posterrl"}', '{"address": 3}'])
def test_torn_cluster_file_names_the_file(tmp_path, text):
    (tmp_path / CLUSTER_FILE).write_text(text)
    with pytest.raises(UserError, match="cluster.json") as error:
        read_cluster_file(tmp_path)
    assert "may not be running" in str(error.value) and str(tmp_path) in str(error.value)


def test_cluster_file_reads_back(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_cluster_file(tmp_path)
    (tmp_path / CLUSTER_FILE).write_text(json.dumps({"address": "10.0.0.1:6379", "namespace": "posterrl"}))
    assert read_cluster_file(tmp_path)["address"] == "10.0.0.1:6379"


@pytest.mark.parametrize("text, what", [
    ("", "empty or torn"),
    ('{"tag": "step_00', "empty or torn"),
    ("[1]", "JSON list"),
    ('{"step": 3}', '"tag" is None'),
    ('{"tag": "../step_0000003", "step": 3}', "\"tag\" is '../step_0000003'"),
    ('{"tag": "step_0000003", "step": "3"}', "\"step\" is '3'"),
    ('{"tag": "step_0000009", "step": 9}', "does not exist"),
])
def test_torn_latest_json_names_the_file(tmp_path, text, what):
    (tmp_path / "step_0000003").mkdir()
    (tmp_path / LATEST_FILE).write_text(text)
    with pytest.raises(CheckpointError) as error:
        read_latest(tmp_path)
    assert str(tmp_path / LATEST_FILE) in str(error.value) and what in str(error.value)
    assert isinstance(error.value, UserError)
    with pytest.raises(CheckpointError):
        latest_checkpoint(tmp_path)  # what the stages ask before resuming


def test_latest_json_reads_back(tmp_path):
    assert latest_checkpoint(tmp_path) is None  # nothing saved yet: the stage starts from the beginning
    (tmp_path / "step_0000003").mkdir()
    (tmp_path / LATEST_FILE).write_text(json.dumps({"tag": "step_0000003", "step": 3}))
    assert read_latest(tmp_path) == latest_checkpoint(tmp_path) == {"tag": "step_0000003", "step": 3}
