"""The public calls that work at module boundaries: ``convert(..., shift_inputs=...)`` and ``insert_module``.

Each converted output is checked against the same network run by hand, with ``temporal_shift``
applied where the call says it goes.
"""

import copy

import pytest
import torch
from torch import nn

import tsm_surgery
from tsm_surgery import temporal_shift

T = 4


class Plain(nn.Module):
    """A stem and three blocks that sum two parallel convolutions: no residual join (MobileOne-like)."""

    def __init__(self, width=16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.ModuleList(Branches(width) for _ in range(3))
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


class Branches(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.a = nn.Conv2d(width, width, 3, padding=1)
        self.b = nn.Conv2d(width, width, 1)

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x))


def _by_hand(model, x, shifted=(), after=None):
    """``model``'s forward with the input of the blocks in ``shifted`` shifted, ``after`` = (index, fn)."""
    x = model.stem(x)
    for i, block in enumerate(model.blocks):
        x = block(temporal_shift(x, T, 8) if i in shifted else x)
        if after is not None and after[0] == i:
            x = after[1](x)
    return model.head(x.mean((2, 3)))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Plain().eval()


def test_shift_inputs_shifts_each_matching_module_input(model):
    x = torch.randn(2 * T, 3, 16, 16)
    net = tsm_surgery.convert(model, T, shift_inputs="blocks.*", example_input=x[:1])
    assert [s.name for s in net.sites] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(s.kind == "block_entry" and s.channels == 16 for s in net.sites)
    assert list(net.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), _by_hand(model, x, shifted=(0, 1, 2)), rtol=0, atol=0)
        net.train()
        torch.testing.assert_close(net(x), _by_hand(model.train(), x, shifted=(0, 1, 2)), rtol=0, atol=0)


def test_shift_inputs_leaves_out_the_image_and_takes_select(model):
    x = torch.randn(T, 3, 16, 16)
    net = tsm_surgery.convert(model, T, shift_inputs=["stem", "blocks.*"], select="blocks.[02]", example_input=x[:1])
    assert [s.name for s in net.sites] == ["blocks.0", "blocks.2"]  # the stem takes 3 channels, fewer than 8
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), _by_hand(model, x, shifted=(0, 2)), rtol=0, atol=0)


def test_shift_inputs_matching_nothing_says_how_patterns_match(model):
    with pytest.raises(ValueError, match=r"shift_inputs=\['layer\*'\].*segment by segment"):
        tsm_surgery.convert(model, T, shift_inputs="layer*", example_input=torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("where", ["after", "before"])
def test_insert_module_calls_it_at_the_boundary_in_both_graphs(model, where):
    x = torch.randn(2 * T, 3, 16, 16)
    net = tsm_surgery.convert(model, T, shift_inputs="blocks.*", example_input=x[:1])
    extra = nn.Conv2d(16, 16, 1)
    tsm_surgery.insert_module(net, "blocks.1.extra", extra, at="blocks.1", where=where)
    assert "blocks.1.extra.weight" in net.state_dict()
    with torch.no_grad():
        if where == "after":
            expected = _by_hand(model, x, shifted=(0, 1, 2), after=(1, extra))
        else:  # the shift convert put at blocks.1's input belongs to blocks.1: the new module runs before it
            y = model.blocks[0](temporal_shift(model.stem(x), T, 8))
            y = model.blocks[1](temporal_shift(extra(y), T, 8))
            expected = model.head(model.blocks[2](temporal_shift(y, T, 8)).mean((2, 3)))
        got = net.eval()(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(net.train()(x), got, rtol=0, atol=0)  # no norm: both graphs compute the same
        copied = copy.deepcopy(net).eval()
        torch.testing.assert_close(copied(x), got, rtol=0, atol=0)


def test_insert_module_at_the_top_after_residual_sites():
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.resnet18(num_classes=3).eval()
    net = tsm_surgery.convert(model, T)
    tsm_surgery.insert_module(net, "pool", nn.Identity(), at="layer1")
    assert "pool" in dict(net.named_children())
    x = torch.randn(T, 3, 32, 32)
    with torch.no_grad():
        reference = tsm_surgery.convert(model, T).eval()(x)
        torch.testing.assert_close(net.eval()(x), reference, rtol=0, atol=0)


def test_insert_module_refuses_bad_calls(model):
    net = tsm_surgery.convert(model, T, shift_inputs="blocks.*", example_input=torch.randn(1, 3, 16, 16))
    with pytest.raises(TypeError, match="made by tsm_surgery.convert"):
        tsm_surgery.insert_module(model, "x", nn.Identity(), at="blocks.0")
    with pytest.raises(ValueError, match="where='inside'"):
        tsm_surgery.insert_module(net, "x", nn.Identity(), at="blocks.0", where="inside")
    with pytest.raises(ValueError, match="'head' is already"):
        tsm_surgery.insert_module(net, "head", nn.Identity(), at="blocks.0")
    with pytest.raises(ValueError, match="no operation of module 'blocks.9'"):
        tsm_surgery.insert_module(net, "x", nn.Identity(), at="blocks.9")
    with pytest.raises(ValueError, match="'double' is already"):  # nn.Module's own method
        tsm_surgery.insert_module(net, "double", nn.Identity(), at="blocks.0")
    assert "x" not in dict(net.named_children())  # nothing was registered by a refused call
