"""scripts/estimate_scaling.py counts what docs/scaling.md says: the released architectures built on the meta device.

A wrong config (a block too few, a wrong width) moves a parameter count by more than the few percent allowed here,
and the LoRA and FLOP counts are checked against closed forms and against torch's own FLOP counter.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "estimate_scaling.py"


@pytest.fixture(scope="module")
def est():
    spec = importlib.util.spec_from_file_location("estimate_scaling", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_parameter_counts_match_the_published_sizes(est):
    for (kind, name), reference in est.REFERENCE_SIZES.items():
        count = est.parameters(est.components(kind)[name])
        assert abs(count / reference - 1) < 0.01, (kind, name, count, reference)  # one block of 60 is 1.6%
    for (kind, name), (published, _) in est.PUBLISHED.items():
        count = est.parameters(est.components(kind)[name])
        assert abs(count / published - 1) < 0.03, (kind, name, count, published)
    assert est.parameters(est.reward_vlm()) == est.parameters(est.components("qwen_image_edit")["text_encoder"])
    # The sizes commonly quoted for the parts without a figure above: T5 v1.1 XXL encoder 4.76 B, CLIP-L text 123 M.
    flux = est.components("flux_kontext")
    assert abs(est.parameters(flux["text_encoder_2"]) / 4.76e9 - 1) < 0.01
    assert abs(est.parameters(flux["text_encoder"]) / 123e6 - 1) < 0.01


def test_lora_counts_walk_the_linears(est):
    flux, qwen = est.components("flux_kontext")["transformer"], est.components("qwen_image_edit")["transformer"]
    width = 24 * 128
    # attention: 8 projections of width x width in each FLUX double block and each Qwen block, 3 in a single block
    assert est.lora_parameters(flux, "attn", 32) == 32 * 2 * width * (19 * 8 + 38 * 3)
    assert est.lora_parameters(qwen, "attn", 32) == 32 * 2 * width * 60 * 8
    # + feed-forward: two 4x MLPs per double / Qwen block, proj_mlp (width -> 4 width) and proj_out (5 width -> width)
    ff = 2 * (width + 4 * width)
    assert est.lora_parameters(flux, "attn+ff", 64) == 64 * (
        19 * (8 * 2 * width + 2 * ff) + 38 * (3 * 2 * width + (width + 4 * width) + (5 * width + width)))
    assert est.lora_parameters(qwen, "attn+ff", 64) == 64 * 60 * (8 * 2 * width + 2 * ff)


def test_tokens_at_1024(est):
    assert est.vl_image_tokens(1024) == 37 * 37  # 1024 px -> 1036 px (multiples of 28) -> 74 x 74 patches, 2 x 2 merge
    flux, qwen = est.tokens("flux_kontext"), est.tokens("qwen_image_edit")
    assert (flux.noisy, flux.condition, flux.text) == (4096, 4096, 512)
    assert (qwen.noisy, qwen.condition) == (4096, 4096) and qwen.text > 37 * 37


def test_transformer_flops_agree_with_torch_flop_counter(est):
    prof = est.call_profile("flux_kontext")
    transformer = est.components("flux_kontext")["transformer"]
    sequence = prof.tokens.total
    assert len(prof.attention) == 19 + 38
    assert prof.attention_flops() == pytest.approx(4 * sequence**2 * 24 * 128 * 57)
    total = prof.linear_flops(transformer) + prof.attention_flops()
    assert total == pytest.approx(est.flop_counter_total("flux_kontext"), rel=5e-3)
