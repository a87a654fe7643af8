import pytest
import torch
from torch import fx

from tsm_surgery import TemporalShift, temporal_shift

# (direction, uni_slot) by test id: "uni_first" is the paper's online-demo layout
LAYOUTS = {"bi": ("bi", "past"), "uni": ("uni", "past"), "uni_first": ("uni", "first")}


def naive_shift(x, n_segments, shift_div, direction, uni_slot="past"):
    """Frame-by-frame, channel-by-channel reference on (N*T, C, ...) tensors."""
    out = torch.zeros_like(x)
    channels = x.shape[1]
    fold = channels // shift_div
    past = range(0, fold) if uni_slot == "first" else range(fold, 2 * fold)
    future = range(0, fold) if direction == "bi" else range(0)
    for clip in range(x.shape[0] // n_segments):
        for t in range(n_segments):
            row = clip * n_segments + t
            for c in range(channels):
                if c in future:
                    if t + 1 < n_segments:
                        out[row, c] = x[row + 1, c]
                elif c in past:
                    if t > 0:
                        out[row, c] = x[row - 1, c]
                else:
                    out[row, c] = x[row, c]
    return out


def test_hand_made_bi():
    # 3 frames, 4 channels, shift_div=4: channel 0 from the future, channel 1 from the past.
    x = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]).reshape(3, 4, 1, 1)
    out = temporal_shift(x, n_segments=3, shift_div=4, direction="bi").flatten(1)
    assert out.tolist() == [[5, 0, 3, 4], [9, 2, 7, 8], [0, 6, 11, 12]]


def test_hand_made_uni():
    x = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]).reshape(3, 4, 1, 1)
    out = temporal_shift(x, n_segments=3, shift_div=4, direction="uni").flatten(1)
    assert out.tolist() == [[1, 0, 3, 4], [5, 2, 7, 8], [9, 6, 11, 12]]


def test_clips_do_not_leak_into_each_other():
    x = torch.arange(2 * 2 * 2.0).reshape(4, 2, 1, 1)  # 2 clips of 2 frames, 2 channels
    out = temporal_shift(x, n_segments=2, shift_div=2, direction="bi").flatten(1)
    # frame 1 of clip 0 gets zeros from the future, not frame 0 of clip 1
    assert out.tolist() == [[2, 0], [0, 1], [6, 0], [0, 5]]


def test_hand_made_uni_first_slot():
    # the paper's online demo: channels [0, fold) come from the previous frame
    x = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]).reshape(3, 4, 1, 1)
    out = temporal_shift(x, n_segments=3, shift_div=4, direction="uni", uni_slot="first").flatten(1)
    assert out.tolist() == [[0, 2, 3, 4], [1, 6, 7, 8], [5, 10, 11, 12]]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shift_div", [2, 3, 8])
@pytest.mark.parametrize("n_segments", [1, 3, 4])
def test_matches_naive_reference(layout, shift_div, n_segments):
    direction, slot = LAYOUTS[layout]
    x = torch.randn(2 * n_segments, 17, 3, 2)
    expected = naive_shift(x, n_segments, shift_div, direction, slot)
    out = temporal_shift(x, n_segments, shift_div, direction, uni_slot=slot)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_form_matches_the_reference(layout):
    # the eager copy, the views + cat form (script, trace, export) and the select form (compile)
    from tsm_surgery._shift import _mode, _shift_frames, _shift_selecting

    direction, slot = LAYOUTS[layout]
    x = torch.randn(8, 16, 3, 2)
    expected = naive_shift(x, 4, 8, direction, slot)
    mode = _mode(direction, slot)
    torch.testing.assert_close(_shift_frames(x.view(2, 4, 16, 3, 2), 2, 2, mode).reshape(x.shape), expected)
    torch.testing.assert_close(_shift_selecting(x, 4, 2, mode, 1), expected)
    scripted = torch.jit.script(TemporalShift(4, 8, direction, uni_slot=slot))
    torch.testing.assert_close(scripted(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_channels_last_matches_and_keeps_format(layout):
    direction, slot = LAYOUTS[layout]
    x = torch.randn(8, 16, 5, 4)
    cl = x.to(memory_format=torch.channels_last)
    out = temporal_shift(cl, 4, 8, direction, uni_slot=slot)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, naive_shift(x, 4, 8, direction, slot), rtol=0, atol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tokens_channel_last_dim(layout):
    direction, slot = LAYOUTS[layout]
    tokens = torch.randn(6, 5, 16)  # (N*T, L, C)
    out = temporal_shift(tokens, 3, 4, direction, channel_dim=-1, uni_slot=slot)
    as_nchw = tokens.permute(0, 2, 1)
    expected = naive_shift(as_nchw, 3, 4, direction, slot).permute(0, 2, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_input_untouched():
    x = torch.randn(4, 8, 2, 2)
    before = x.clone()
    temporal_shift(x, 2, 4)
    assert torch.equal(x, before)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck(layout, channels_last):
    direction, slot = LAYOUTS[layout]
    x = torch.randn(6, 8, 2, 3, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: temporal_shift(t, 3, 4, direction, uni_slot=slot), (x,))


def test_gradcheck_tokens():
    x = torch.randn(4, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: temporal_shift(t, 2, 4, "bi", channel_dim=-1), (x,))


def test_batch_not_multiple_of_segments():
    with pytest.raises(ValueError, match=r"batch 10 is not a multiple of n_segments=8.*\(N\*T, C, H, W\)"):
        temporal_shift(torch.randn(10, 16, 2, 2), n_segments=8)


def test_too_few_channels():
    with pytest.raises(ValueError, match="4 channels.*shift_div"):
        temporal_shift(torch.randn(8, 4, 2, 2), n_segments=8, shift_div=8)


def test_bad_direction():
    with pytest.raises(ValueError, match="direction='sideways'"):
        TemporalShift(8, direction="sideways")


@pytest.mark.parametrize("kwargs, name", [
    (dict(n_segments=2.5), "n_segments"), (dict(n_segments=True), "n_segments"),
    (dict(n_segments=None), "n_segments"), (dict(n_segments=float("nan")), "n_segments"),
    (dict(n_segments=0), "n_segments"), (dict(n_segments=4, shift_div=2.5), "shift_div"),
    (dict(n_segments=4, shift_div=True), "shift_div"), (dict(n_segments=4, shift_div=1), "shift_div"),
    (dict(n_segments=4, channel_dim=1.0), "channel_dim"), (dict(n_segments=4, channel_dim=True), "channel_dim"),
    (dict(n_segments=4, uni_slot="last"), "uni_slot"), (dict(n_segments=4, uni_slot="first"), "uni_slot"),
])
def test_bad_settings_are_refused_naming_the_parameter(kwargs, name):
    # never truncated or coerced: 2.5 is not 2, True is not 1; uni_slot="first" needs direction="uni"
    with pytest.raises(ValueError, match=name):
        TemporalShift(**kwargs)
    with pytest.raises(ValueError, match=name):
        temporal_shift(torch.randn(8, 16, 2, 2), **kwargs)


@pytest.mark.parametrize("channel_dim", [4, 5, -5])
def test_channel_dim_out_of_range_is_refused_not_wrapped(channel_dim):
    with pytest.raises(ValueError, match=f"channel_dim={channel_dim} is out of range.*rank 4"):
        temporal_shift(torch.randn(8, 16, 2, 2), 4, channel_dim=channel_dim)
    with pytest.raises(ValueError, match=f"channel_dim={channel_dim} is out of range"):
        TemporalShift(4, channel_dim=channel_dim)(torch.randn(8, 16, 2, 2))


def test_one_fx_node_when_traced():
    class UsesOp(torch.nn.Module):
        def forward(self, x):
            return temporal_shift(x, 4, 8, "uni") * 2

    gm = fx.symbolic_trace(UsesOp())
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert calls[0].target is temporal_shift and len(calls) == 2
    x = torch.randn(8, 16, 3, 3)
    torch.testing.assert_close(gm(x), temporal_shift(x, 4, 8, "uni") * 2)


def test_module_scripts():
    shift = TemporalShift(4, 8, "bi")
    scripted = torch.jit.script(shift)
    x = torch.randn(8, 16, 3, 3)
    torch.testing.assert_close(scripted(x), shift(x), rtol=0, atol=0)
    torch.testing.assert_close(scripted(x.to(memory_format=torch.channels_last)), shift(x), rtol=0, atol=0)
