"""Discovery rules: one toy model per rule of site analysis (tsm_surgery/_sites.py, _no_residual.py)."""

import pytest
import torch
from torch import nn

import tsm_surgery
from tsm_surgery import convert, find_residual_sites
from tsm_surgery._sites import KINDS, analyse_graph
from tsm_surgery._tracer import trace


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
    with pytest.raises(ValueError, match="no_residual='block_entry'"):
        convert(model, 3, example_input=x)
    sites = [s for s in find_residual_sites(model, x, all_joins=True) if s.kind == "block_entry"]
    # the dense layer (after its norm+act), the two-branch module (one site for both branches),
    # every layer of the plain stack but none reading the image or the pooled features
    assert [s.name for s in sites] == ["layer", "mixed", "plain.0", "plain.1", "plain.2", "plain.3"]
    assert sites[1].branch_consumers == ("mixed_a", "mixed_b")
    net = convert(model, 3, direction="uni", example_input=x, no_residual="block_entry").eval()
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




class DataDependent(nn.Module):
    """A residual block next to an op whose output size depends on the values (``x[x > 0]``)."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x)
        return x.mean((2, 3)) + x[x > 0].sum()


def test_data_dependent_ops_find_sites_silently(capfd):
    # Fake tensors cannot follow x[x > 0]; the real-tensor fallback must not print the failure.
    sites = find_residual_sites(DataDependent(), torch.randn(1, 3, 8, 8))
    assert [s.name for s in sites] == ["body"] and sites[0].shape == (1, 8, 8, 8)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_analysis_writes_nothing_to_the_graph():
    model = TokenNet().eval()
    graph = trace(model)
    before = [dict(n.meta) for n in graph.nodes]
    _, sites = analyse_graph(model, graph, torch.randn(1, 3, 16, 16))
    assert [dict(n.meta) for n in graph.nodes] == before
    assert {s.kind for s in sites} <= set(KINDS)
    # the same graph analysed twice gives the same records (no state left from the first pass)
    assert analyse_graph(model, graph, torch.randn(1, 3, 16, 16))[1] == sites


def test_block_entry_entries_name_their_tensor_not_a_join():
    sites = [s for s in find_residual_sites(DenseLike(), torch.randn(1, 3, 8, 8), all_joins=True)]
    assert sites and all(s.kind == "block_entry" and s.join == "" for s in sites)
    # each entry's tensor feeds its first layers; the branch consumers are those readers
    assert sites[0].branch_consumers == ("layer_0",)
