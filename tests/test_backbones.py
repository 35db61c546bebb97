"""Tests of examples/backbones: every named configuration's size, output shape and gradients."""

from __future__ import annotations

import doctest
import functools
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import backbones  # noqa: E402
from backbones import factory  # noqa: E402
from backbones.__main__ import main as list_backbones  # noqa: E402

HW2P2_CLASSES = 7001
EMBEDDING_DIM = 512
TOY = [name for name in backbones.available() if name.endswith("_toy")]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small convolutions run fastest on one thread, and CI runs two test processes on two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.cache
def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return backbones.build(name, EMBEDDING_DIM).eval()


def test_named_configurations_include_the_documented_ones() -> None:
    for name in ("resnet18", "resnet34", "resnet50", "se_resnet18", "convnext_t", "mobilenetv2", "resnet_toy", "convnext_toy"):
        assert name in backbones.available()


@pytest.mark.parametrize("name", backbones.available())
def test_fits_the_hw2p2_parameter_limit_with_a_7001_class_classifier(name: str) -> None:
    params = backbones.count_parameters(_model(name))
    total = params + EMBEDDING_DIM * HW2P2_CLASSES
    assert total <= backbones.PARAMETER_LIMIT, f"{name}: {params:,} + classifier = {total:,} > 21M"


@pytest.mark.parametrize("size", [64, 112])
@pytest.mark.parametrize("name", backbones.available())
def test_maps_images_to_embeddings(name: str, size: int) -> None:
    with torch.no_grad():
        embeddings = _model(name)(torch.randn(2, 3, size, size))
    assert embeddings.shape == (2, EMBEDDING_DIM)
    assert torch.isfinite(embeddings).all()


@pytest.mark.parametrize("name", TOY)
def test_toy_configurations_train(name: str) -> None:
    torch.manual_seed(0)
    model = backbones.build(name, 16).train()
    loss = model(torch.randn(4, 3, 32, 32)).square().mean()
    loss.backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name}.{parameter_name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), f"{name}.{parameter_name} has a non-finite gradient"


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9000'; choose one of: resnet18, "):
        backbones.build("resnet9000", 8)


def test_every_configuration_is_described() -> None:
    for name in backbones.available():
        assert backbones.describe(name)


def test_se_resnet_has_a_gate_in_every_block() -> None:
    model = backbones.build("se_resnet18", 8)
    gates = [module for module in model.modules() if isinstance(module, backbones.SqueezeExcitation)]
    blocks = [module for module in model.modules() if isinstance(module, backbones.BasicBlock)]
    assert len(gates) == len(blocks) == 8


def test_squeeze_excitation_rescales_channels_by_gates_in_0_1() -> None:
    torch.manual_seed(0)
    block = backbones.SqueezeExcitation(32, reduction=4)
    features = torch.rand(2, 32, 5, 5) + 0.1
    ratio = block(features) / features
    assert ratio.shape == features.shape
    # One gate per (sample, channel): constant over space, strictly between 0 and 1.
    assert torch.allclose(ratio, ratio[..., :1, :1].expand_as(ratio), atol=1e-6)
    assert ((ratio > 0) & (ratio < 1)).all()


@pytest.mark.parametrize("block", [backbones.BasicBlock, backbones.Bottleneck])
def test_residual_blocks_start_as_identity_plus_relu(block: type[nn.Module]) -> None:
    torch.manual_seed(0)
    channels = 8
    module = block(channels * block.expansion, channels).eval()  # type: ignore[attr-defined]
    features = torch.randn(2, channels * block.expansion, 6, 6)
    # The last BatchNorm of the branch starts at zero (Goyal et al.), so the block is relu(x).
    assert torch.allclose(module(features), torch.relu(features))


def test_resnet_downsamples_by_16_and_widens_bottleneck_outputs() -> None:
    trunk = backbones.ResNet(backbones.Bottleneck, (1, 1, 1, 1), (4, 8, 16, 32))
    assert trunk(torch.randn(1, 3, 64, 64)).shape == (1, 128, 4, 4)
    assert trunk.out_channels == 128


def test_convnext_block_keeps_shape_and_layer_scale_starts_small() -> None:
    torch.manual_seed(0)
    block = backbones.ConvNeXtBlock(16, layer_scale_init=1e-6).eval()
    features = torch.randn(2, 16, 7, 7)
    output = block(features)
    assert output.shape == features.shape
    assert (output - features).abs().max() < 1e-3


def test_drop_path_is_identity_in_eval_and_drops_whole_samples_in_training() -> None:
    torch.manual_seed(0)
    drop = backbones.DropPath(0.5)
    residual = torch.ones(64, 3, 2, 2)
    assert torch.equal(drop.eval()(residual), residual)
    dropped = drop.train()(residual)
    per_sample = dropped.flatten(1)
    # Every sample is either dropped entirely or kept and scaled by 1 / keep_prob.
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 0 < int((per_sample == 0).all(1).sum()) < 64
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\), got 1.0"):
        backbones.DropPath(1.0)


def test_convnext_stochastic_depth_grows_linearly_to_the_rate() -> None:
    trunk = backbones.ConvNeXt((1, 1, 1, 1), (8, 8, 8, 8), drop_path_rate=0.3)
    rates = [module.drop_prob for module in trunk.modules() if isinstance(module, backbones.DropPath)]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_layer_norm_2d_normalises_over_channels() -> None:
    norm = backbones.LayerNorm2d(6)
    output = norm(torch.randn(2, 6, 3, 3) * 5 + 2)
    assert torch.allclose(output.mean(1), torch.zeros(2, 3, 3), atol=1e-5)
    assert torch.allclose(output.var(1, unbiased=False), torch.ones(2, 3, 3), atol=1e-3)


def test_inverted_residual_uses_the_shortcut_only_when_shapes_match() -> None:
    assert backbones.InvertedResidual(16, 16, 1, 6).use_residual
    assert not backbones.InvertedResidual(16, 16, 2, 6).use_residual
    assert not backbones.InvertedResidual(16, 24, 1, 6).use_residual
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        backbones.InvertedResidual(16, 16, 3, 6)


def test_factory_docstring_examples_run() -> None:
    result = doctest.testmod(factory, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_listing_prints_every_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert list_backbones(["--embedding-dim", "64", "--num-classes", "10"]) == 0
    out = capsys.readouterr().out
    for name in backbones.available():
        assert name in out
    assert "over the 21M limit" not in out
