"""Names renamed in 0.2 keep working for one release, with a DeprecationWarning."""

import pickle

import pytest
import torch
from torch import nn

import tsm_surgery
from tsm_surgery import convert


def plain_stack():
    """A network without residual joins: its sites are block entries."""
    convs = [nn.Conv2d(3, 16, 3, padding=1)] + [nn.Conv2d(16, 16, 3, padding=1) for _ in range(3)]
    return nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


def test_residual_site_is_the_shift_site_class():
    with pytest.warns(DeprecationWarning, match="use tsm_surgery.ShiftSite"):
        from tsm_surgery import ResidualSite
    assert ResidualSite is tsm_surgery.ShiftSite
    with pytest.warns(DeprecationWarning):
        assert tsm_surgery._sites.ResidualSite is tsm_surgery.ShiftSite
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        tsm_surgery.NoSuchName  # noqa: B018


def test_first_conv_policy_is_block_entry():
    model, x = plain_stack(), torch.randn(1, 3, 8, 8)
    with pytest.warns(DeprecationWarning, match="no_residual='block_entry'"):
        old = convert(model, 3, example_input=x, no_residual="first_conv").eval()
    new = convert(model, 3, example_input=x, no_residual="block_entry").eval()
    assert [s.name for s in old.sites] == [s.name for s in new.sites] and new.sites[0].kind == "block_entry"
    clip = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(old(clip), new(clip))


def test_a_network_pickled_by_0_1_loads():
    net = convert(plain_stack(), 3, example_input=torch.randn(1, 3, 8, 8), no_residual="block_entry").eval()
    # Protocol 0 names classes and functions as text lines, so the 0.1 module paths can be put back.
    data = pickle.dumps(net, protocol=0)
    for new, old in ((b"tsm_surgery._graph_module\n_restore\n", b"tsm_surgery._graph\n_restore\n"),
                     (b"tsm_surgery._sites\nShiftSite\n", b"tsm_surgery._sites\nResidualSite\n")):
        assert new in data
        data = data.replace(new, old)
    with pytest.warns(DeprecationWarning, match="ResidualSite is deprecated"):
        loaded = pickle.loads(data)
    clip = torch.randn(3, 3, 8, 8)
    assert type(loaded.sites[0]) is tsm_surgery.ShiftSite
    torch.testing.assert_close(loaded(clip), net(clip))
