"""An optimizer constructor with TSM's learning-rate policy for any backbone.

MMAction2's ``TSMOptimWrapperConstructor`` sorts parameters by module type (conv, linear,
BatchNorm/GroupNorm) and raises ``ValueError: New atomic module type`` on anything else:
LayerNorm, embeddings, timm's layer scales or a ViT's ``cls_token``. This constructor applies
the same policy by what a parameter is, so every parameter lands in exactly one group.
"""


from mmaction.registry import OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn
from torch.nn.modules.conv import _ConvNd

from tsm_surgery.integrations.models.norms import is_norm

__all__ = ["TSMSurgeryOptimWrapperConstructor"]


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class TSMSurgeryOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """TSM's parameter groups for backbones of any family.

    Groups (as in the TSM paper's code and MMAction2's ``TSMOptimWrapperConstructor``):

    1. the first convolution's weight: base lr and weight decay; its bias: 2x lr, no decay;
    2. other conv/linear weights and any other parameter with 2+ dims (embeddings, position
       embeddings, class tokens): base lr and decay;
    3. other biases: 2x lr, no decay;
    4. norm parameters (BatchNorm, SyncBatchNorm, GroupNorm, LayerNorm, any ``*Norm*`` class)
       and other 1-dim parameters (layer scales): base lr, no decay;
    5. with ``paramwise_cfg=dict(fc_lr5=True)``, the head's classifier (``cls_head.fc_cls``,
       else the last ``nn.Linear``): weight 5x lr, bias 10x lr without decay.

    Frozen parameters (``requires_grad=False``) are left out; a shared parameter is counted once.

    Example:
        >>> optim_wrapper = dict(constructor='TSMSurgeryOptimWrapperConstructor',
        ...                      paramwise_cfg=dict(fc_lr5=True),
        ...                      optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=1e-4))
    """

    def add_params(self, params: list[dict], module: nn.Module, **kwargs) -> None:
        fc_lr5 = bool(self.paramwise_cfg.get("fc_lr5", False))
        groups = {name: [] for name in ("first_w", "first_b", "weight", "bias", "no_decay", "fc_w", "fc_b")}
        seen = set()
        fc = getattr(getattr(module, "cls_head", None), "fc_cls", None)
        if fc is None:
            linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
            fc = linears[-1] if linears else None
        first_conv = next((m for m in module.modules() if isinstance(m, _ConvNd)), None)

        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                is_bias = name == "bias"
                if fc_lr5 and sub is fc:
                    groups["fc_b" if is_bias else "fc_w"].append(param)
                elif sub is first_conv:
                    groups["first_b" if is_bias else "first_w"].append(param)
                elif is_norm(sub):
                    groups["no_decay"].append(param)
                elif is_bias:
                    groups["bias"].append(param)
                elif param.ndim >= 2:
                    groups["weight"].append(param)
                else:
                    groups["no_decay"].append(param)

        lr, wd = self.base_lr, self.base_wd
        settings = {
            "first_w": dict(lr=lr, weight_decay=wd),
            "first_b": dict(lr=lr * 2, weight_decay=0),
            "weight": dict(lr=lr, weight_decay=wd),
            "bias": dict(lr=lr * 2, weight_decay=0),
            "no_decay": dict(lr=lr, weight_decay=0),
            "fc_w": dict(lr=lr * 5, weight_decay=wd),
            "fc_b": dict(lr=lr * 10, weight_decay=0),
        }
        for name, group in groups.items():
            if group:
                setting = dict(settings[name])
                if wd is None and setting["weight_decay"] is None:
                    del setting["weight_decay"]  # the optimizer's own default
                params.append(dict(params=group, **setting))
