"""Coverage: a representative subset of timm/torchvision models, and one toy model per discovery rule.

The full sweep (`tsm-surgery coverage`, every family) is marked slow; this subset runs the same
checks (`check_model`) in-process on small inputs.
"""

import pytest
import torch
from torch import nn

import tsm_surgery
from tsm_surgery import convert, find_residual_sites
from tsm_surgery._tracer import trace

timm_coverage = pytest.importorskip("tsm_surgery.integrations.timm_coverage")
ModelSpec, check_model = timm_coverage.ModelSpec, timm_coverage.check_model

# (source, name, family, expected policy, expected layout): every one passes bi + uni + online
SUBSET = [
    ("timm", "resnet18", "resnet", "residual", "NCHW"),
    ("timm", "convnext_atto", "convnext", "residual", "NCHW"),
    ("timm", "mobilenetv3_small_050", "mobilenetv3", "residual", "NCHW"),
    ("timm", "regnetx_002", "regnet", "residual", "NCHW"),
    ("timm", "nf_regnet_b0", "nfnet", "residual", "NCHW"),  # timm-registered blocks traced into
    ("timm", "convmixer_768_32", "convmixer", "residual", "NCHW"),  # single-layer identity residuals
    ("timm", "cspnext_tiny", "cspnext", "residual", "NCHW"),
    ("torchvision", "squeezenet1_1", "tv.squeezenet", "first_conv", "NCHW"),
    ("torchvision", "googlenet", "tv.googlenet", "first_conv", "NCHW"),  # aux heads in train mode only
    ("timm", "vit_tiny_patch16_224", "vision_transformer", "residual", "tokens"),
    ("timm", "deit_tiny_patch16_224", "deit", "residual", "tokens"),
    ("timm", "swin_tiny_patch4_window7_224", "swin_transformer", "residual", "NHWC/tokens"),
    ("timm", "pvt_v2_b0", "pvt_v2", "residual", "tokens"),
    ("timm", "levit_128s", "levit", "residual", "tokens"),
    ("timm", "gmlp_ti16_224", "mlp_mixer", "residual", "tokens"),
]


@pytest.mark.parametrize("source,name,family,policy,layout", SUBSET, ids=[s[1] for s in SUBSET])
def test_subset_passes(source, name, family, policy, layout):
    res = check_model(ModelSpec(source, family, (name,)), frames=3)
    assert res.reason == "", res.reason
    assert res.traced and res.sites > 0
    assert res.bi and res.effective and res.uni and res.online and res.backward and res.passed
    assert (res.policy, res.layout) == (policy, layout)


def test_failure_is_reported_not_raised():
    res = check_model(ModelSpec("timm", "resnet", ("no_such_model_xyz",)), frames=3)
    assert not res.passed and res.stage == "build" and "no_such_model_xyz" in res.reason


def test_summary_counts_families():
    rows = [
        {"source": "timm", "family": "a", "kind": "cnn", "passed": True},
        {"source": "timm", "family": "b", "kind": "cnn", "passed": False},
        {"source": "timm", "family": "c", "kind": "transformer", "passed": True},
    ]
    summary = timm_coverage.summarize(rows)
    assert (summary["cnn"]["passed"], summary["cnn"]["families"], summary["cnn"]["rate"]) == (1, 2, 50.0)
    assert summary["all"]["rate"] == pytest.approx(66.7)


@pytest.mark.slow
def test_full_sweep_meets_targets(tmp_path):
    import argparse

    out = tmp_path / "COVERAGE.md"
    args = argparse.Namespace(models=None, limit=None, out=str(out), json=None, jobs=2, timeout=300.0, frames=4)
    assert timm_coverage.run(args) == 0
    import json

    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert summary["cnn"]["rate"] >= 95.0 and summary["transformer"]["rate"] >= 80.0


# ---------------------------------------------------------------------------------------------
# One toy model per discovery/tracing rule


def kinds(model, x):
    return [(s.kind, s.name) for s in find_residual_sites(model, x, all_joins=True)]


class SingleLayerResidual(nn.Module):
    """ConvMixer-style: x + act(bn(dwconv(x))) (identity shortcut), then a parallel BN-identity sum."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 5, padding=2, groups=c)
        self.k1, self.bn = nn.Conv2d(c, c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        x = self.stem(x)
        x = x + torch.relu(self.dw(x))
        return self.k1(x) + self.bn(x)  # RepVGG-style: the BN "identity" is a branch, not a shortcut


def test_single_layer_identity_residual_rule():
    found = kinds(SingleLayerResidual(), torch.randn(1, 3, 8, 8))
    assert found[0][0] == "residual" and found[1][0] == "multi_branch"


class DenseLike(nn.Module):
    """No residual join: dense concatenation, a two-branch module and a plain layer stack."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layer = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 3, padding=1))
        self.mixed = nn.ModuleDict({"a": nn.Conv2d(2 * c, c, 1), "b": nn.Conv2d(2 * c, c, 3, padding=1)})
        self.plain = nn.Sequential(*[nn.Conv2d(2 * c, 2 * c, 3, padding=1) for _ in range(4)])
        self.head = nn.Linear(2 * c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.layer(x)], 1)
        x = torch.cat([self.mixed["a"](x), self.mixed["b"](x)], 1)
        x = self.plain(x)
        return self.head(x.mean((2, 3)))


def test_no_residual_policy_is_opt_in_and_streams():
    model, x = DenseLike().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="no_residual='first_conv'"):
        convert(model, 3, example_input=x)
    sites = [s for s in find_residual_sites(model, x, all_joins=True) if s.kind == "first_conv"]
    # the dense layer (after its norm+act), the two-branch module (one site for both branches),
    # every layer of the plain stack but none reading the image or the pooled features
    assert [s.name for s in sites] == ["layer", "mixed", "plain.0", "plain.1", "plain.2", "plain.3"]
    assert sites[1].branch_consumers == ("mixed_a", "mixed_b")
    net = convert(model, 3, direction="uni", example_input=x, no_residual="first_conv").eval()
    clip = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        offline, plain = net(clip), model(clip)
        online = tsm_surgery.to_online(net)
        streamed = torch.cat([online(clip[t:t + 1]) for t in range(3)])
    assert not torch.allclose(offline, plain)
    torch.testing.assert_close(streamed, offline, rtol=1e-5, atol=1e-5)


class HeadSplitSum(nn.Module):
    """MViT-style residual pooling inside attention: (attn @ v) + q on head-split tensors."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = (q @ k.transpose(-2, -1)).softmax(-1) @ v + q
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class TokenNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 4, 4)
        self.norm, self.attn = nn.LayerNorm(c), HeadSplitSum(c)
        self.mlp = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x)


def test_attention_internal_sums_are_not_residual_and_tokens_shift_channels():
    found = find_residual_sites(TokenNet(), torch.randn(1, 3, 16, 16), all_joins=True)
    residual = [s for s in found if s.kind == "residual"]
    assert [s.name for s in residual] == ["attn", "mlp"]
    assert all(s.channel_dim == -1 and s.shape == (1, 16, 16) for s in residual)
    internal = [s for s in found if s.kind == "internal"]
    assert len(internal) == 1 and "attention" in internal[0].reason


class PatchFold(nn.Module):
    """TNT-style inner blocks: patches folded into the batch dim, then a residual on them."""

    def __init__(self, c=8):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 1)
        self.inner = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c))
        self.outer = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        x = self.embed(x)
        b, c, h, w = x.shape
        t = x.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)  # every pixel its own "sample"
        t = t + self.inner(t)
        x = t.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + self.outer(x)


def test_joins_on_batch_folded_tensors_are_not_shifted():
    found = kinds(PatchFold(), torch.randn(1, 3, 4, 4))
    assert found == [("internal", "inner"), ("residual", "outer")] or \
        [k for k, _ in found] == ["internal", "residual"]


class WithAux(nn.Module):
    """An auxiliary head that exists only in training, and optional forward arguments."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.aux = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x, mask=None, scale: float = 1.0):
        x = self.stem(x)
        y = (x + self.block(x)) * scale
        if self.training:
            return y, x + self.aux(x)
        return y


def test_train_only_joins_stay_unshifted_and_defaults_are_fixed():
    model = WithAux()
    graph = trace(model.eval())
    assert [n.name for n in graph.nodes if n.op == "placeholder"] == ["x"]
    net = convert(model, 2, example_input=torch.randn(1, 3, 8, 8))
    assert [s.name for s in net.sites] == ["block"]
    net.train()
    out, aux = net(torch.randn(4, 3, 8, 8))
    (out.sum() + aux.sum()).backward()
    assert sum(1 for n in net.train_graph.nodes if n.op == "call_module" and n.target.startswith("temporal_shifts")) == 1


def test_timm_registered_blocks_are_traced_into_unless_untraceable():
    fx_registry = pytest.importorskip("timm.layers._fx")

    class RegisteredBlock(nn.Module):
        def __init__(self, c=8):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

        def forward(self, x):
            return x + self.body(x)

    class RegisteredUntraceable(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block, self.gate = nn.Conv2d(3, 8, 1), RegisteredBlock(), RegisteredUntraceable()

        def forward(self, x):
            return self.gate(self.block(self.stem(x)))

    fx_registry.register_notrace_module(RegisteredBlock)
    fx_registry.register_notrace_module(RegisteredUntraceable)
    graph = trace(Net())
    assert graph.kept_whole == (RegisteredUntraceable,)
    assert [s.name for s in find_residual_sites(Net(), torch.randn(1, 3, 8, 8))] == ["block"]


class ConstantInForward(nn.Module):
    """Swin-style: a tensor built in forward becomes a graph constant."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        x = self.stem(x)
        return x + self.body(x) * torch.tensor([0.5])


def test_traced_tensor_constants_survive_conversion_and_copies():
    import copy

    net = convert(ConstantInForward(), 2, example_input=torch.randn(1, 3, 8, 8)).eval()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(copy.deepcopy(net)(x), net(x))
