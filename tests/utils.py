"""Helpers shared by the tests."""

import torch


def randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Gives every norm layer random affine weights and statistics.

    timm zero-initialises the last norm of each residual branch, so a fresh model's branches
    output zeros and a shift inside them would change nothing.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if getattr(module, "weight", None) is not None:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
                if getattr(module, "running_var", None) is not None:
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
            for name, param in module.named_parameters(recurse=False):
                if name in ("gamma", "scale") or name.startswith("gamma"):
                    param.uniform_(0.5, 1.5)
    return model
