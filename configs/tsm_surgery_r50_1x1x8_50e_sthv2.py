# TSM-R50 on Something-Something V2 (174 classes, flip swaps the left/right labels), 1x1x8
# frames: the stock sthv2 ResNetTSM config with the surgery backbone.
_base_ = ['mmaction::recognition/tsm/tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_sthv2-rgb.py']

custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='TSMSurgeryBackbone',
        backbone=dict(type='ResNet', depth=50, pretrained='torchvision://resnet50', norm_eval=False),
        num_segments=8,
        shift_div=8,
        shift_place='blockres',
        direction='bi'),
    cls_head=dict(num_segments=8))

custom_hooks = [dict(type='ClipLengthHook')]
optim_wrapper = dict(constructor='TSMSurgeryOptimWrapperConstructor')
