"""A minimal re-implementation of the TSM paper's published models (mit-han-lab/temporal-shift-module).

Only structure, module naming and forward semantics follow the paper's code, so that a
``state_dict()`` of these models has the keys of the paper's checkpoints:

* ``ops/temporal_shift.py``: ``TemporalShift`` wraps a layer as ``.net`` and shifts its input
  with a zero-filled copy (channels ``[0, fold)`` from t+1, ``[fold, 2*fold)`` from t-1);
  ``make_temporal_shift`` wraps each block's ``conv1`` (``blockres``), every other block once
  ``layer3`` has 23 or more blocks.
* ``ops/models.py``: ``TSN`` keeps the 2D network as ``base_model``, turns its classifier into
  dropout and adds ``new_fc``; averages the frame scores. Checkpoints are saved from
  ``nn.DataParallel`` (``module.`` prefix). MobileNetV2 shifts the first layer of each
  8-entry inverted residual with a residual connection.
* ``archs/mobilenet_v2.py``: MobileNetV2 with flat blocks (``conv`` is one ``Sequential`` of
  5 or 8 layers), ``features`` a ``Sequential``, a ``Linear`` ``classifier``, mean pooling.
* ``online_demo/mobilenet_v2_tsm.py``: the same MobileNetV2 whose blocks 2, 4, 5, 7, 8, 9, 11,
  12, 14, 15 take a shift buffer: the branch reads the previous frame's first ``c // 8``
  channels in place of its own, and the block hands this frame's first ``c // 8`` on.
"""

import torch
import torchvision
from torch import nn


class PaperTemporalShift(nn.Module):
    def __init__(self, net: nn.Module, n_segment: int, n_div: int = 8):
        super().__init__()
        self.net = net
        self.n_segment = n_segment
        self.fold_div = n_div

    def forward(self, x):
        nt, c, h, w = x.shape
        x = x.view(nt // self.n_segment, self.n_segment, c, h, w)
        fold = c // self.fold_div
        out = torch.zeros_like(x)
        out[:, :-1, :fold] = x[:, 1:, :fold]
        out[:, 1:, fold:2 * fold] = x[:, :-1, fold:2 * fold]
        out[:, :, 2 * fold:] = x[:, :, 2 * fold:]
        return self.net(out.view(nt, c, h, w))


class PaperTSN(nn.Module):
    def __init__(self, base_model: nn.Module, last_layer: str, num_class: int, num_segments: int):
        super().__init__()
        self.base_model = base_model
        self.num_segments = num_segments
        feature_dim = getattr(base_model, last_layer).in_features
        setattr(base_model, last_layer, nn.Dropout(p=0.5))
        self.new_fc = nn.Linear(feature_dim, num_class)

    def forward(self, x):  # (N * T, 3, H, W) -> (N, num_class)
        out = self.new_fc(self.base_model(x))
        return out.view(-1, self.num_segments, out.shape[-1]).mean(1)


def paper_resnet_tsn(depth: int, num_class: int, num_segments: int) -> nn.Module:
    base = getattr(torchvision.models, f"resnet{depth}")()
    n_round = 2 if len(base.layer3) >= 23 else 1
    for stage in (base.layer1, base.layer2, base.layer3, base.layer4):
        for i, block in enumerate(stage):
            if i % n_round == 0:
                block.conv1 = PaperTemporalShift(block.conv1, num_segments)
    return nn.DataParallel(PaperTSN(base, "fc", num_class, num_segments))


def _conv_bn(inp, oup, kernel, stride, groups=1):
    return [nn.Conv2d(inp, oup, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(oup)]


class PaperInvertedResidual(nn.Module):
    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = int(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers = [] if expand_ratio == 1 else [*_conv_bn(inp, hidden, 1, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
                   *_conv_bn(hidden, oup, 1, 1)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class PaperInvertedResidualWithShift(PaperInvertedResidual):
    def forward(self, x, shift_buffer):
        c = x.size(1)
        head, tail = x[:, : c // 8], x[:, c // 8:]
        return x + self.conv(torch.cat((shift_buffer, tail), dim=1)), head


SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
ONLINE_SHIFT_BLOCKS = (2, 4, 5, 7, 8, 9, 11, 12, 14, 15)


class PaperMobileNetV2(nn.Module):
    def __init__(self, n_class=1000, online=False):
        super().__init__()
        features = [nn.Sequential(*_conv_bn(3, 32, 3, 2), nn.ReLU6(inplace=True))]
        inp, index = 32, 0
        for t, c, n, s in SETTING:
            for i in range(n):
                shifted = online and index in ONLINE_SHIFT_BLOCKS
                block = PaperInvertedResidualWithShift if shifted else PaperInvertedResidual
                features.append(block(inp, c, s if i == 0 else 1, t))
                inp, index = c, index + 1
        features.append(nn.Sequential(*_conv_bn(inp, 1280, 1, 1), nn.ReLU6(inplace=True)))
        self.features = nn.ModuleList(features) if online else nn.Sequential(*features)
        self.classifier = nn.Linear(1280, n_class)
        for m in self.modules():  # the paper's init: He-normal convs (fan out), so activations keep their scale
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, (2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)) ** 0.5)

    def forward(self, x, *shift_buffer):
        if not isinstance(self.features, nn.ModuleList):
            return self.classifier(self.features(x).mean(3).mean(2))
        buffers, out_buffer = iter(shift_buffer), []
        for f in self.features:
            if isinstance(f, PaperInvertedResidualWithShift):
                x, s = f(x, next(buffers))
                out_buffer.append(s)
            else:
                x = f(x)
        return (self.classifier(x.mean(3).mean(2)), *out_buffer)


def paper_mobilenet_v2_tsn(num_class: int, num_segments: int) -> nn.Module:
    base = PaperMobileNetV2()
    for m in base.modules():
        if isinstance(m, PaperInvertedResidual) and len(m.conv) == 8 and m.use_res_connect:
            m.conv[0] = PaperTemporalShift(m.conv[0], num_segments)
    return nn.DataParallel(PaperTSN(base, "classifier", num_class, num_segments))


def online_buffers(model: PaperMobileNetV2, frame: torch.Tensor):
    """Zero shift buffers for one frame: the first c // 8 channels of each shifting block's input."""
    shapes, x = [], frame
    with torch.no_grad():
        for f in model.features:
            if isinstance(f, PaperInvertedResidualWithShift):
                shapes.append((x.shape[0], x.shape[1] // 8, *x.shape[2:]))
                x = f(x, torch.zeros(shapes[-1]))[0]
            else:
                x = f(x)
    return [torch.zeros(s) for s in shapes]


def calibrate_norms(model: nn.Module, *inputs: torch.Tensor) -> nn.Module:
    """Sets every BatchNorm's running statistics from one train-mode pass over ``inputs``; returns ``model`` in eval.

    Random running statistics do not match the activations, and through MobileNetV2's
    depthwise layers the signal then fades: the output stops depending on the input and an
    equality test proves nothing. Statistics measured on data keep each layer's scale.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the pass
    model.train()
    with torch.no_grad():
        model(*inputs)
    for m in norms:
        m.momentum = 0.1
    model.eval()
    return model

