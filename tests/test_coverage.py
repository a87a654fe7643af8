"""Coverage: a representative subset of timm/torchvision models.

The full sweep (`tsm-surgery coverage`, every family) is marked slow; this subset runs the same
checks (`check_model`) in-process on small inputs. The discovery and tracing rules each have a
toy model in test_sites.py and test_tracer.py.
"""

import pytest

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
