# TSM: the same 2D ResNet-18 (same weights layout, same head) converted by tsm_surgery: 1/8 of
# the channels of every residual branch come from the next frame and 1/8 from the previous one.
_base_ = ['./_base_demo.py']

custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)

model = dict(backbone=dict(
    _delete_=True,
    type='TSMSurgeryBackbone',
    backbone={{_base_.backbone_2d}},
    shift_div=8,
    shift_place='blockres',
    direction='bi'))
# num_segments is not repeated here: the hook sets it from the pipeline's SampleFrames.
custom_hooks = [dict(type='ClipLengthHook')]
