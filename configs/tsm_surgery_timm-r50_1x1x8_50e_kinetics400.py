# TSM with timm's ResNet-50 (ImageNet weights from timm), Kinetics-400, 1x1x8 frames.
_base_ = ['mmaction::recognition/tsm/tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_kinetics400-rgb.py']

custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='TSMSurgeryBackbone',
        # num_classes=0 and global_pool='' are added by the plugin: NCHW features for TSMHead.
        backbone=dict(type='timm.resnet50', pretrained=True),
        num_segments=8,
        shift_div=8,
        shift_place='blockres',
        direction='bi'),
    cls_head=dict(num_segments=8, in_channels=2048))

custom_hooks = [dict(type='ClipLengthHook')]
optim_wrapper = dict(constructor='TSMSurgeryOptimWrapperConstructor')
