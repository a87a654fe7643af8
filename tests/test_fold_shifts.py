"""The folded online step (``OnlineTSM.folded_step_module``): each shift folded into the layer that
reads it. Checked against the step graph it comes from, frame by frame with the caches fed back."""

import pytest
import torch
from torch import nn
from utils import randomize_norms

import tsm_surgery
from tsm_surgery.integrations.models import build_model

SIZE = 48
FRAMES = 4
RTOL = 1e-5  # the folded sum rounds differently from the one convolution


class Tokens(nn.Module):
    """Pre-MLP token blocks: each branch starts with a Linear on channels-last tokens."""

    def __init__(self, width=32, blocks=2):
        super().__init__()
        self.embed = nn.Linear(12, width)
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
                                  for _ in range(blocks))
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        x = self.embed(x)
        for mlp in self.mlps:
            x = x + mlp(x)
        return self.head(x.mean(1))


def _uni_net(spec, direction="uni"):
    torch.manual_seed(0)
    if spec == "tokens":
        model, frame = Tokens().eval(), (6, 12)
    else:
        head = {} if spec.startswith("mmaction:") else {"num_classes": 5}  # an MMAction2 backbone has no head
        model, frame = randomize_norms(build_model(spec, **head)), (3, SIZE, SIZE)
        model.eval()  # mmaction's ResNet.eval returns None: never chain it
    net = tsm_surgery.convert(model, n_segments=FRAMES, direction=direction, example_input=torch.randn(FRAMES, *frame))
    return net.eval(), frame


def _online(spec):
    net, frame = _uni_net(spec)
    return tsm_surgery.to_online(net, frame_shape=frame), frame


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _stream(step, online, frame, seed=1):
    """Outputs and caches of ``step`` over FRAMES frames (two streams), the caches fed back."""
    generator = torch.Generator().manual_seed(seed)
    caches = list(online.init_state(2, frame_shape=frame).values())
    outs = []
    for _ in range(FRAMES):
        result = step(torch.randn(2, *frame, generator=generator), *caches)
        outs.append(result[0])
        caches = list(result[1:])
    return torch.stack(outs), caches


# (spec, how many sites fold): a conv module (timm, torchvision), a conv call on a constant weight
# (mmcv's ConvModule traced into), a linear on tokens; depthwise-first branches keep their shift.
CASES = [("timm:mobilenetv2_100", "all"), ("timm:resnet18", "all"), ("torchvision:resnet18", "all"),
         ("mmaction:resnet18", "all"), ("tokens", "all"), ("timm:convnext_atto", "none")]


@pytest.mark.parametrize("spec,folds", CASES)
@torch.no_grad()
def test_folded_step_equals_the_step_frame_by_frame(spec, folds):
    online, frame = _online(spec)
    folded = online.folded_step_module()
    assert folded.folded_sites == (online.state_names if folds == "all" else [])
    expected, expected_caches = _stream(online.step_module, online, frame)
    got, caches = _stream(folded, online, frame)
    assert _rel(got, expected) <= RTOL
    for cache, reference in zip(caches, expected_caches):
        assert cache.shape == reference.shape and _rel(cache, reference) <= RTOL
    if folds == "none":
        assert torch.equal(got, expected)


@torch.no_grad()
def test_the_shift_really_moves_the_slot():
    """Another cache changes the folded output (the side layer reads it), as it changes the step's."""
    online, frame = _online("timm:resnet18")
    folded = online.folded_step_module()
    x = torch.randn(1, *frame)
    zeros = list(online.init_state(1, frame_shape=frame).values())
    ones = [torch.ones_like(c) for c in zeros]
    moved = _rel(folded(x, *ones)[0], folded(x, *zeros)[0])
    assert moved > 100 * RTOL
    assert _rel(folded(x, *ones)[0], online.step_module(x, *ones)[0]) <= RTOL


@torch.no_grad()
def test_folding_leaves_the_online_network_as_it_was():
    online, _ = _online("timm:resnet18")
    before = {k: v.clone() for k, v in online.state_dict().items()}
    nodes = len(online.step_module.graph.nodes)
    folded = online.folded_step_module()
    for weight in folded.get_submodule("folded").buffers():
        weight.add_(1.0)  # the folded weights are copies: the online network must not see this
    assert len(online.step_module.graph.nodes) == nodes
    after = online.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- the clip network (TSMNet.folded_module): the same folding, the slot moved one frame along the clip --


@pytest.mark.parametrize("spec,folds", CASES)
def test_folded_clip_network_equals_the_network(spec, folds):
    net, frame = _uni_net(spec)
    folded = net.folded_module()
    assert len(folded.folded_sites) == (len(net.sites) if folds == "all" else 0)
    clips = torch.randn(2 * FRAMES, *frame, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel(folded(clips), net(clips)) < RTOL
        # a change at frame 0 of the first clip reaches frame 1 (only through the moved slot), not the other clip
        changed = clips.clone()
        changed[0] += 1.0
        moved = (folded(changed) - folded(clips)).flatten(1).abs().amax(1)
    assert moved[1] > 0 and moved[FRAMES:].max() == 0


def test_folded_clip_network_keeps_bi_sites_and_the_network():
    net, frame = _uni_net("timm:resnet18", direction="bi")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded = net.folded_module()
    clips = torch.randn(FRAMES, *frame)
    with torch.no_grad():
        assert folded.folded_sites == [] and torch.equal(folded(clips), net(clips))  # bi reads the future: kept
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
