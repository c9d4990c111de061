"""`posterrl model make-tiny`: tiny local checkpoints of FLUX.1 Kontext and Qwen-Image-Edit that plain diffusers
loads and runs, the same bytes for the same seed, and no overwritten folder without --force."""

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from posterrl import names
from posterrl.cli import main
from posterrl.models import tiny_pipelines

# model_index.json of the released checkpoints (black-forest-labs/FLUX.1-Kontext-dev, Qwen/Qwen-Image-Edit), by
# component. The released FLUX file names tokenizer_2 T5TokenizerFast, which transformers 5 names T5Tokenizer.
RELEASED_LAYOUT = {
    "flux_kontext": {
        "_class_name": "FluxKontextPipeline",
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5Tokenizer"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
    },
    "qwen_image_edit": {
        "_class_name": "QwenImageEditPipeline",
        "transformer": ["diffusers", "QwenImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"], "processor": ["transformers", "Qwen2VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    },
}


def make_tiny_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posterrl.cli", "model", "make-tiny", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each kind written once by the real command, seed 0."""
    dirs = {}
    for kind in names.PIPELINE_MODEL_KINDS:
        out = tmp_path_factory.mktemp("tiny") / kind
        proc = make_tiny_cli("--kind", kind, "--out", str(out), "--seed", "0")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"to {out}" in proc.stdout and "parameters" in proc.stdout
        dirs[kind] = out
    return dirs


def file_hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def input_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def check_output(images: np.ndarray) -> None:
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_builders_cover_the_pipeline_kinds():
    assert tuple(tiny_pipelines.BUILDERS) == names.PIPELINE_MODEL_KINDS
    assert "tiny_flux" not in names.PIPELINE_MODEL_KINDS


@pytest.mark.parametrize("kind", names.PIPELINE_MODEL_KINDS)
def test_layout_is_the_released_one(tiny_dirs, kind):
    index = json.loads((tiny_dirs[kind] / "model_index.json").read_text())
    index.pop("_diffusers_version")
    assert index == RELEASED_LAYOUT[kind]
    components = {name: entry for name, entry in index.items() if not name.startswith("_")}
    assert sorted(p.name for p in tiny_dirs[kind].iterdir() if p.is_dir()) == sorted(
        name for name, (library, _) in components.items() if library is not None)


def test_flux_kontext_loads_and_edits(tiny_dirs):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline.from_pretrained(tiny_dirs["flux_kontext"])
    pipe.set_progress_bar_config(disable=True)
    # _auto_resize=False, max_area: keep the 32 px input and output (the pipeline scales to ~1 Mpx otherwise)
    images = pipe(image=input_image(), prompt="Make the title red.", height=32, width=32, max_area=32 * 32,
                  _auto_resize=False, num_inference_steps=2, max_sequence_length=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    check_output(images)


def test_qwen_image_edit_loads_and_edits(tiny_dirs):
    from diffusers import QwenImageEditPipeline

    out = tiny_dirs["qwen_image_edit"]
    if importlib.util.find_spec("torchvision") is None:
        # Without torchvision, transformers cannot build Qwen2VLProcessor's video part, for this folder as for a
        # downloaded one; everything else loads plainly, and the processor without its video part stands in.
        with pytest.raises(ImportError, match="Qwen2VLVideoProcessor requires the Torchvision library"):
            QwenImageEditPipeline.from_pretrained(out)
        pipe = QwenImageEditPipeline.from_pretrained(out, processor=tiny_pipelines.image_only_processor(out))
    else:
        pipe = QwenImageEditPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    # The pipeline scales the condition image to ~1024 x 1024 whatever its size; the output is 32 px.
    images = pipe(image=input_image(), prompt="Make the title red.", height=32, width=32, num_inference_steps=2,
                  true_cfg_scale=1.0, max_sequence_length=64, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    check_output(images)


def test_qwen_tokenizer_drops_exactly_the_system_prompt(tiny_dirs):
    """The pipeline drops a fixed number of leading hidden states (the released tokenizer's length of the system
    prompt); the tiny tokenizer gives the system prompt that same length, so only the prompt is dropped."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["qwen_image_edit"] / "tokenizer")
    template, drop = tiny_pipelines.qwen_prompt_template()
    assert len(tokenizer(template.split("<|vision_start|>")[0]).input_ids) == drop


@pytest.mark.parametrize("kind", names.PIPELINE_MODEL_KINDS)
def test_same_seed_same_files(tiny_dirs, tmp_path, kind):
    """In this process as in the command's: the same bytes for seed 0, new weights (and only those) for seed 1."""
    first = file_hashes(tiny_dirs[kind])
    assert first == file_hashes(tiny_pipelines.make_tiny(kind, tmp_path / "again", seed=0))
    other = file_hashes(tiny_pipelines.make_tiny(kind, tmp_path / "other", seed=1))
    changed = {name for name in first if first[name] != other[name]}
    assert changed == {name for name in first if name.endswith(".safetensors")}


def test_refuses_a_non_empty_out_unless_forced(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["model", "make-tiny", "--kind", "flux_kontext", "--out", str(out)]) == 2
    assert f"--out {out}: the directory is not empty; pass --force" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not out.with_name("taken.tmp").exists()

    (tmp_path / "file").write_text("")
    assert main(["model", "make-tiny", "--kind", "flux_kontext", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().out

    assert main(["model", "make-tiny", "--kind", "flux_kontext", "--out", str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken"]  # no staging folder left behind
