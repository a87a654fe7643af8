# The stock TSN-R50 Kinetics-400 config turned into TSM: its backbone entry is wrapped in
# TSMSurgeryBackbone, nothing else changes. The same wrapping turns every stock TSN config into
# TSM: mmcls./mmpretrain. types (ResNeXt, MobileOne), timm Swin (its NHWC maps reach the head as
# NCHW; a `feature_shape` key is honoured) and torchvision DenseNet-161 (no residual join: add
# no_residual='block_entry').
_base_ = ['mmaction::recognition/tsn/tsn_imagenet-pretrained-r50_8xb32-1x1x8-100e_kinetics400-rgb.py']

custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='TSMSurgeryBackbone',
        backbone={{_base_.model.backbone}},
        num_segments=8))

custom_hooks = [dict(type='ClipLengthHook')]
