"""Vision Transformers of the zoo: shapes, closed-form parameter counts, the FSDP units, attention
against a hand-written reference, initialisation, a few SGD steps, and `otmdr train` on digits."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from otmdr.cli import main
from otmdr.models import count_parameters, create_model
from otmdr.models.vit import Block, wrap_units
from otmdr.train import load_run

pytestmark = pytest.mark.usefixtures("one_thread")

#: (embed, depth, heads) of each registered ViT, from the issue (MLP ratio 4, patch 4 for all)
SIZES = {"vit-mini": (64, 4, 4), "vit-tiny": (192, 12, 3), "vit-small": (384, 12, 6)}


def closed_form_parameters(embed: int, depth: int, *, mlp_ratio: int = 4, patch: int = 4, image: int = 32,
                           channels: int = 3, classes: int = 10) -> int:
    """The parameter count of the architecture, layer by layer."""
    hidden = mlp_ratio * embed
    patch_embedding = channels * patch * patch * embed + embed  # convolution weight and bias
    positions = (image // patch) ** 2 * embed  # one learned vector per patch, no class token
    layer_norm = 2 * embed
    attention = (embed * 3 * embed + 3 * embed) + (embed * embed + embed)  # qkv and output projection
    mlp = (embed * hidden + hidden) + (hidden * embed + embed)
    block = 2 * layer_norm + attention + mlp
    head = embed * classes + classes
    return patch_embedding + positions + depth * block + layer_norm + head


@pytest.mark.parametrize("name", ["vit-mini", "vit-tiny"])
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_output_shapes_for_cifar_and_mnist_sized_images(name, channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=channels, input_size=size)
    assert model.grid == (size // 4, size // 4) and model.pos_embed.shape[1] == (size // 4) ** 2
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(SIZES))
def test_parameter_counts_match_the_closed_form(name):
    embed, depth, _ = SIZES[name]
    with torch.device("meta"):  # sizes only: no memory, no initialisation
        model = create_model(name)
        grey = create_model(name, num_classes=100, in_channels=1, input_size=28)
    assert count_parameters(model) == closed_form_parameters(embed, depth)
    assert count_parameters(grey) == closed_form_parameters(embed, depth, image=28, channels=1, classes=100)


def test_parameter_counts_of_the_documented_sizes():
    # ViT-Tiny and ViT-Small are DeiT-Ti (5.7M) and DeiT-S (22M) less the 224x224 position
    # embeddings, the class token and the 1000-way head, with 4x4 instead of 16x16 patches.
    assert closed_form_parameters(192, 12) / 1e6 == pytest.approx(5.36, abs=0.01)
    assert closed_form_parameters(384, 12) / 1e6 == pytest.approx(21.34, abs=0.01)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_blocks_are_the_fsdp_units(name):
    embed, depth, heads = SIZES[name]
    with torch.device("meta"):
        model = create_model(name)
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == depth
    assert all(type(block) is Block for block in model.blocks)
    assert model.blocks[0].attn.num_heads == heads and model.blocks[0].attn.head_dim == embed // heads
    units = wrap_units(model)
    assert len(units) == depth and all(unit is block for unit, block in zip(units, model.blocks))
    # every parameter outside the blocks is in the root: patch and position embeddings, final norm, head
    in_units = {id(p) for unit in units for p in unit.parameters()}
    rest = [n for n, p in model.named_parameters() if id(p) not in in_units]
    assert sorted(rest) == ["head.bias", "head.weight", "norm.bias", "norm.weight", "patch_embed.bias",
                            "patch_embed.weight", "pos_embed"]


def test_wrap_units_of_an_ensemble_and_of_a_model_without_vits():
    ensemble = create_model("vit-mini-x2")
    assert len(wrap_units(ensemble)) == 2 * SIZES["vit-mini"][1]
    assert wrap_units(create_model("lenet")) == []


def test_attention_matches_softmax_of_scaled_dot_products():
    torch.manual_seed(0)
    dim, heads, tokens = 12, 3, 5
    block = Block(dim, heads).double()
    attention = block.attn
    x = torch.randn(2, tokens, dim, dtype=torch.float64)
    w, b = attention.qkv.weight, attention.qkv.bias  # rows: queries, then keys, then values
    q, k, v = (x @ w[i * dim:(i + 1) * dim].T + b[i * dim:(i + 1) * dim] for i in range(3))
    d = dim // heads
    outputs = []
    for h in range(heads):
        qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
        weights = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
        outputs.append(weights @ vh)
    expected = torch.cat(outputs, dim=-1) @ attention.proj.weight.T + attention.proj.bias
    torch.testing.assert_close(attention(x), expected)
    # and the whole pre-norm block: x + attn(LN(x)), then + mlp(LN(.))
    y = x + attention(block.norm1(x))
    torch.testing.assert_close(block(x), y + block.mlp(block.norm2(y)))


def test_initialisation_is_truncated_normal_with_zero_biases_and_unit_layer_norms():
    torch.manual_seed(0)
    model = create_model("vit-tiny")
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            assert module.weight.abs().max() <= 0.04 + 1e-7, name  # cut at two standard deviations
            assert torch.count_nonzero(module.bias) == 0, name
        elif isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
    # a normal cut at +-2 std has std 0.02 * 0.880
    assert model.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02 * 0.880, rel=0.02)
    assert model.pos_embed.std().item() == pytest.approx(0.02 * 0.880, rel=0.05)
    assert model.pos_embed.abs().max() <= 0.04 + 1e-7


def test_dropout_and_stochastic_depth_are_off_by_default_and_options():
    torch.manual_seed(0)
    model = create_model("vit-mini").train()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(x), model.eval()(x))  # nothing random in training mode
    noisy = create_model("vit-mini", dropout=0.1, drop_path=0.2).train()
    assert [block.drop_path.p for block in noisy.blocks] == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2])
    assert not torch.equal(noisy(x), noisy(x))
    noisy.eval()
    torch.testing.assert_close(noisy(x), noisy(x))


def test_other_input_sizes_resize_the_position_grid_and_bad_sizes_are_refused():
    model = create_model("vit-mini")  # position embeddings for an 8x8 grid (32x32 images)
    assert model.position_embedding(8, 8) is model.pos_embed
    assert model.position_embedding(7, 7).shape == (1, 49, 64)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(2, 3, 30, 30))
    with pytest.raises(ValueError, match="num_heads"):
        create_model("vit-mini", num_heads=5)
    with pytest.raises(ValueError, match="embed_dim"):
        create_model("vit-mini", embed_dim=0)
    with pytest.raises(TypeError):
        create_model("vit-mini", width=3)
    assert create_model("vit-mini", input_size=8, patch_size=2).grid == (4, 4)


def test_a_few_sgd_steps_of_vit_mini_reduce_the_loss():
    torch.manual_seed(0)
    # two classes told apart by the brightness of the red channel: linearly separable
    n = 64
    labels = torch.arange(n) % 2
    x = torch.randn(n, 3, 32, 32)
    x[:, 0] += 0.5 * (2 * labels - 1).float().view(-1, 1, 1)
    model = create_model("vit-mini", num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # plain SGD, full batch
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        logits = model(x)
    assert F.cross_entropy(logits, labels).item() < 0.2 * losses[0], losses  # 0.67 -> 0.02 here
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert (logits.argmax(1) == labels).all()


def test_cli_trains_vit_mini_on_digits(tmp_path):
    out = tmp_path / "vit"
    settings = ["model.name=vit-mini", "train.epochs=1", "data.train_limit=256", "train.progress=false"]
    assert main(["train", "--out", str(out)] + sum((["--set", s] for s in settings), [])) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["test"]["nll"]) and 0 <= summary["test"]["accuracy"] <= 1
    cfg, model, _ = load_run(out)
    assert cfg.model.name == "vit-mini"
    assert model.grid == (2, 2)  # digits are 8x8: the data's size reached the position embeddings
    assert count_parameters(model) == closed_form_parameters(64, 4, image=8, channels=1)
