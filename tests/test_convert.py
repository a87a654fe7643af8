import copy
import io

import pytest
import timm
import torch
import torchvision
from torch import nn
from utils import randomize_norms

import tsm_surgery
from tsm_surgery import TraceError, convert, find_residual_sites

SEGMENTS = 4

# Sites a person counts by eye: one per residual block.
SITE_COUNTS = {
    "torchvision:resnet18": 8,
    "torchvision:mobilenet_v2": 10,
    "timm:resnet18": 8,
    "timm:mobilenetv2_100": 10,
    "timm:efficientnet_b0": 9,
    "timm:convnext_atto": 12,       # 2 + 2 + 6 + 2 blocks
    "timm:vit_tiny_patch16_224": 24,  # attention and MLP residual in each of 12 blocks
}


def build(spec, **kwargs):
    source, name = spec.split(":")
    if source == "timm":
        return timm.create_model(name, pretrained=False, **kwargs)
    return torchvision.models.get_model(name, weights=None, **kwargs)


@pytest.mark.parametrize("spec", list(SITE_COUNTS))
def test_site_counts(spec):
    sites = find_residual_sites(build(spec))
    assert len(sites) == SITE_COUNTS[spec]
    assert len({s.name for s in sites}) == len(sites)


def test_site_names_and_consumers_on_resnet18():
    sites = find_residual_sites(torchvision.models.resnet18())
    assert [s.name for s in sites] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    first, down = sites[0], sites[2]
    assert (first.channels, first.channel_dim, first.shape) == (64, 1, (1, 64, 56, 56))
    assert first.branch_consumers == ("layer1_0_conv1",) and first.shortcut_consumers == ("add",)
    # layer2.0 has a projection shortcut: the downsample reads the fork unshifted
    assert down.branch_consumers == ("layer2_0_conv1",)
    assert down.shortcut_consumers == ("layer2_0_downsample_0",)
    assert (down.branch_depth, down.shortcut_depth) == (2, 1)


def test_all_joins_separates_kinds():
    kinds = {s.name: s.kind for s in find_residual_sites(build("timm:vit_tiny_patch16_224"), all_joins=True)}
    assert kinds["blocks.0.attn"] == kinds["blocks.0.mlp"] == "residual"
    assert "broadcast" in kinds.values()  # the position embedding add


class RepBlock(nn.Module):
    """RepVGG-style parallel single-layer branches: a sum, not a residual."""

    def __init__(self, c):
        super().__init__()
        self.k3, self.k1, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.k3(x) + self.k1(x) + self.bn(x))


class SplitSum(nn.Module):
    """Res2Net-style internal sums of a split input and a conv output."""

    def __init__(self, c):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c // 2, c // 2, 3, padding=1) for _ in range(2))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        a = self.convs[0](a)
        b = self.convs[1](a + b)
        return torch.cat([a, b], 1)


class Toy(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.rep = RepBlock(c)
        self.split = SplitSum(c)
        self.res = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        x = self.split(self.rep(self.stem(x))) + self.bias
        return x + self.res(x)


def test_toy_kinds():
    sites = find_residual_sites(Toy(), torch.randn(1, 3, 8, 8), all_joins=True)
    kinds = sorted(s.kind for s in sites)
    assert kinds == ["broadcast", "internal", "multi_branch", "multi_branch", "residual"]
    assert [s.name for s in sites if s.kind == "residual"] == ["res"]


def mmaction_models(depth):
    from tsm_surgery.integrations.mmaction import compat

    compat.apply()
    from mmaction.models.backbones import ResNet, ResNetTSM

    plain = randomize_norms(ResNet(depth=depth, pretrained=None))
    reference = ResNetTSM(depth=depth, num_segments=SEGMENTS, shift_div=8, shift_place="blockres",
                          pretrained2d=False, pretrained=None)
    plain.eval(), reference.eval()  # mmaction's ResNet.train() returns None
    # ResNetTSM wraps each block's conv1.conv in TemporalShift(net=...): same weights, keys with ".net"
    keys = {k.replace(".net.", "."): k for k in reference.state_dict()}
    reference.load_state_dict({keys[k]: v for k, v in plain.state_dict().items()}, strict=True)
    return plain, reference


@pytest.mark.parametrize("depth", [18, 50])
def test_bi_equals_mmaction_resnet_tsm(depth):
    plain, reference = mmaction_models(depth)
    net = convert(plain, SEGMENTS).eval()
    assert len(net.sites) == {18: 8, 50: 16}[depth]
    x = torch.randn(2 * SEGMENTS, 3, 64, 64)
    with torch.no_grad():
        ours, theirs, flat = net(x), reference(x), plain(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())
    assert (ours - flat).abs().max() > 1e-2 * flat.abs().max()  # the shift matters


@pytest.mark.parametrize("spec", ["timm:resnet18", "timm:convnext_atto", "torchvision:mobilenet_v2"])
def test_uni_is_causal(spec):
    model = randomize_norms(build(spec, num_classes=10)).eval()
    net = convert(model, SEGMENTS, direction="uni").eval()
    clip = torch.randn(SEGMENTS, 3, 64, 64)
    later_changed, earlier_changed = clip.clone(), clip.clone()
    later_changed[2:] = torch.randn_like(clip[2:])
    earlier_changed[0] = torch.randn_like(clip[0])
    with torch.no_grad():
        base, later, earlier, flat = net(clip), net(later_changed), net(earlier_changed), model(clip)
    torch.testing.assert_close(later[:2], base[:2], rtol=0, atol=0)   # frames 0, 1 never see frames 2, 3
    assert (earlier[1:] - base[1:]).abs().amax(dim=1).min() > 0       # every later frame sees frame 0
    assert (base - flat).abs().max() > 1e-4 * flat.abs().max()  # float noise is ~1e-7 of it


def test_state_dict_keys_and_strict_load():
    model = build("timm:resnet18")
    net = convert(model, SEGMENTS)
    assert list(net.state_dict()) == list(model.state_dict())
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters())
    assert len(list(net.buffers())) == len(list(model.buffers()))
    checkpoint = io.BytesIO()
    torch.save(randomize_norms(build("timm:resnet18")).state_dict(), checkpoint)
    checkpoint.seek(0)
    state = torch.load(checkpoint, weights_only=True)
    net.load_state_dict(state, strict=True)
    model.load_state_dict(state, strict=True)
    x = torch.randn(SEGMENTS, 3, 32, 32)
    with torch.no_grad():
        # with n_segments=1 the shift sees one frame per clip: only zero padding, so compare
        # against a second, independent conversion instead
        again = convert(model, SEGMENTS).eval()
        torch.testing.assert_close(net.eval()(x), again(x))


def test_caller_model_untouched():
    model = build("timm:resnet18")
    before = copy.deepcopy(model.state_dict())
    net = convert(model, SEGMENTS)
    net.train()
    net(torch.randn(SEGMENTS * 2, 3, 32, 32)).sum().backward()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    assert all(p.grad is None for p in model.parameters())
    assert not any("temporal_shifts" in name for name, _ in model.named_modules())


def test_inplace_shares_parameters():
    model = build("timm:resnet18")
    net = convert(model, SEGMENTS, inplace=True)
    assert net.conv1.weight is model.conv1.weight


def test_train_mode_forward_backward_and_graph_switch():
    model = randomize_norms(build("timm:resnet18", drop_path_rate=0.2, num_classes=5))
    net = convert(model, SEGMENTS)
    net.train()
    assert net.graph is net.train_graph
    out = net(torch.randn(2 * SEGMENTS, 3, 32, 32))
    out.sum().backward()
    assert net.conv1.weight.grad is not None and torch.isfinite(net.conv1.weight.grad).all()
    net.eval()
    assert net.graph is net.eval_graph
    x = torch.randn(2 * SEGMENTS, 3, 32, 32)
    torch.testing.assert_close(net(x), net(x))  # drop path off in eval: deterministic


def test_select_and_place_block():
    model = randomize_norms(torchvision.models.resnet18()).eval()
    every_other = convert(model, SEGMENTS, select=lambda s: s.name.endswith(".0"))
    assert [s.name for s in every_other.sites] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    late = convert(model, SEGMENTS, select=["layer[34].*"])
    assert [s.name for s in late.sites] == ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    block = convert(model, SEGMENTS, place="block", select="layer1.0").eval()
    residual = convert(model, SEGMENTS, select="layer1.0").eval()
    x = torch.randn(SEGMENTS, 3, 32, 32)
    # place="block": the identity shortcut carries the shifted tensor too
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        shifted = tsm_surgery.temporal_shift(stem, SEGMENTS)
        block1 = model.layer1[0]
        expect_block = block1.relu(block1.bn2(block1.conv2(block1.relu(block1.bn1(block1.conv1(shifted))))) + shifted)
        expect_residual = block1.relu(block1.bn2(block1.conv2(block1.relu(block1.bn1(block1.conv1(shifted))))) + stem)

        def tail(h):
            h = model.layer4(model.layer3(model.layer2(model.layer1[1](h))))
            return model.fc(torch.flatten(model.avgpool(h), 1))

        torch.testing.assert_close(block(x), tail(expect_block))
        torch.testing.assert_close(residual(x), tail(expect_residual))


def test_n_segments_changes_without_retracing():
    model = randomize_norms(build("timm:resnet18")).eval()
    net = convert(model, 4).eval()
    x = torch.randn(8, 3, 32, 32)
    graph = net.graph
    net.n_segments = 8
    assert net.graph is graph and net.n_segments == 8
    torch.testing.assert_close(net(x), convert(model, 8).eval()(x))


def test_deepcopy_and_pickle_round_trip():
    net = convert(randomize_norms(build("timm:resnet18")), SEGMENTS).eval()
    x = torch.randn(SEGMENTS, 3, 32, 32)
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(net), torch.load(buffer, weights_only=False)):
        assert isinstance(clone, tsm_surgery.TSMNet) and [s.name for s in clone.sites] == [s.name for s in net.sites]
        torch.testing.assert_close(clone(x), net(x))
        clone.train()
        assert clone.graph is clone.train_graph
    net.recompute_shifts = False  # a user setting travels with the copies
    assert copy.deepcopy(net).recompute_shifts is False
    assert torch.load(io.BytesIO(_saved(net)), weights_only=False).recompute_shifts is False


def _saved(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


def test_errors_have_hints():
    net = convert(build("timm:resnet18"), 8)
    with pytest.raises(ValueError, match="batch 12 is not a multiple of n_segments=8"):
        net(torch.randn(12, 3, 32, 32))
    with pytest.raises(ValueError, match="no residual join.*all_joins=True"):
        convert(torchvision.models.vgg11(), 8)
    with pytest.raises(ValueError, match="matched none of the 8 residual sites"):
        convert(build("timm:resnet18"), 8, select="nothing*")
    with pytest.raises(ValueError, match="fewer than shift_div=128"):
        convert(build("timm:resnet18"), 8, shift_div=128)
    with pytest.raises(ValueError, match="place='inplace'"):
        convert(build("timm:resnet18"), 8, place="inplace")


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:  # control flow on a tensor value: symbolic tracing cannot follow it
            return self.conv(x)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.gate = DataDependent()

    def forward(self, x):
        x = self.stem(x)
        return self.gate(x + self.branch(x))


def test_untraceable_module_is_named_and_leaf_option_works():
    with pytest.raises(TraceError, match=r"(?s)module 'gate' \(DataDependent\).*leaf_modules=\[DataDependent\]"):
        convert(Net(), 2, example_input=torch.randn(1, 3, 8, 8))
    net = convert(Net(), 2, example_input=torch.randn(1, 3, 8, 8), leaf_modules=[DataDependent])
    assert len(net.sites) == 1
    assert net(torch.randn(4, 3, 8, 8)).shape == (4, 8, 8, 8)


def test_converting_a_converted_network_is_refused():
    model = build("timm:resnet18")
    net = convert(model, SEGMENTS)
    for again in (net, tsm_surgery.to_online(convert(model, SEGMENTS, direction="uni")), nn.Sequential(net)):
        for example in (None, torch.randn(1, 3, 32, 32)):  # a batch-1 example once failed elsewhere
            with pytest.raises(ValueError, match=r"(?s)already .*twice.*n_segments"):
                convert(again, SEGMENTS, example_input=example)
    with pytest.raises(ValueError, match="re-convert the original 2D model"):
        convert(net, 8)


@pytest.mark.parametrize("kwargs, name", [
    (dict(n_segments=2.5), "n_segments"), (dict(n_segments=True), "n_segments"),
    (dict(n_segments=None), "n_segments"), (dict(n_segments=float("nan")), "n_segments"),
    (dict(shift_div=2.5), "shift_div"), (dict(shift_div=0), "shift_div"),
    (dict(uni_slot="first"), "uni_slot"), (dict(direction="uni", uni_slot="second"), "uni_slot"),
])
def test_bad_settings_name_the_parameter(kwargs, name):
    kwargs = {"n_segments": SEGMENTS, **kwargs}
    with pytest.raises(ValueError, match=name):
        convert(Net(), example_input=torch.randn(1, 3, 8, 8), leaf_modules=[DataDependent], **kwargs)


def test_n_segments_attribute_is_validated():
    net = convert(build("timm:resnet18"), SEGMENTS)
    for bad in (2.5, True, 0, None):
        with pytest.raises(ValueError, match="n_segments"):
            net.n_segments = bad
    assert net.n_segments == SEGMENTS


def test_leaf_modules_that_match_nothing_are_named():
    with pytest.raises(ValueError, match=r"\['LSTM', 'gate.nope'\] match no module of Net"):
        convert(Net(), 2, example_input=torch.randn(1, 3, 8, 8), leaf_modules=[DataDependent, nn.LSTM, "gate.nope"])
    with pytest.raises(ValueError, match=r"\['stem.conv'\] match no module"):
        find_residual_sites(Net(), torch.randn(1, 3, 8, 8), leaf_modules=["stem.conv"])
    # a path matches, and a class matches its subclasses (Conv2d here)
    net = convert(Net(), 2, example_input=torch.randn(1, 3, 8, 8), leaf_modules=["gate", nn.modules.conv._ConvNd])
    assert [s.name for s in net.sites] == ["branch"]


class ValueGate(nn.Module):
    """A leaf whose output size depends on the values: fake tensors cannot run it."""

    def forward(self, x):
        return x * x[x > 0].numel() / x.numel()


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.gate = ValueGate()

    def forward(self, x):
        x = self.stem(x)
        return self.gate(x + self.branch(x))


def test_convert_with_a_data_dependent_leaf_prints_nothing(capfd):
    net = convert(GatedNet(), 2, example_input=torch.randn(1, 3, 8, 8), leaf_modules=[ValueGate])
    assert [s.name for s in net.sites] == ["branch"]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


@pytest.mark.parametrize("kwargs", [dict(), dict(direction="uni", uni_slot="first")], ids=["bi", "uni_first"])
def test_torchscript_and_trace_give_the_converted_network(kwargs):
    net = convert(randomize_norms(build("timm:resnet18")), SEGMENTS, **kwargs).eval()
    x = torch.randn(2 * SEGMENTS, 3, 32, 32)
    with torch.no_grad():
        expected = net(x)
        scripted = torch.jit.script(net)
        traced = torch.jit.trace(net, x)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(expected, randomize_norms(build("timm:resnet18")).eval()(x))
    assert net._forward_hooks  # scripting used a copy: the network keeps its recompute scope


def test_uni_slot_is_a_setting_of_the_network():
    net = convert(build("timm:resnet18"), SEGMENTS, direction="uni", uni_slot="first")
    assert net.uni_slot == "first" and {m.uni_slot for m in net.shift_modules().values()} == {"first"}
    assert convert(build("timm:resnet18"), SEGMENTS, direction="uni").uni_slot == "past"
    assert "uni_slot='first'" in repr(next(iter(net.shift_modules().values())))
