# Online-ready TSM: timm MobileNetV2 with the uni-directional (past-only) shift, Kinetics-400,
# 1x1x8 frames. A model trained with it streams frame by frame through tsm_surgery.to_online
# with the same outputs as offline (see `tsm-surgery stream`).
_base_ = ['mmaction::recognition/tsm/tsm_imagenet-pretrained-mobilenetv2_8xb16-1x1x8-100e_kinetics400-rgb.py']

custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='TSMSurgeryBackbone',
        backbone=dict(type='timm.mobilenetv2_100', pretrained=True),
        num_segments=8,
        shift_div=8,
        shift_place='blockres',
        direction='uni'),
    cls_head=dict(num_segments=8, in_channels=1280))

custom_hooks = [dict(type='ClipLengthHook')]
# timm's MobileNetV2 has only conv/BN/linear, but this constructor also covers other families.
optim_wrapper = dict(constructor='TSMSurgeryOptimWrapperConstructor')
