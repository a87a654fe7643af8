# TSM-R50, Kinetics-400, 1x1x8 frames, 50 epochs: the stock MMAction2 ResNetTSM config with the
# backbone built by graph surgery instead. With equal weights its outputs equal ResNetTSM's
# (shift_place='blockres', shift_div=8); its state_dict keys are plain ResNet keys, so 2D
# ImageNet/TSN checkpoints load unchanged.
_base_ = ['mmaction::recognition/tsm/tsm_imagenet-pretrained-r50_8xb16-1x1x8-50e_kinetics400-rgb.py']

custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)

# The clip length lives in the pipeline (SampleFrames num_clips): ClipLengthHook and the
# runner set backbone/head num_segments from it, so 8 below is only the build-time value.
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

# Same groups as TSMOptimWrapperConstructor for a ResNet, and it also accepts other families.
optim_wrapper = dict(constructor='TSMSurgeryOptimWrapperConstructor')
