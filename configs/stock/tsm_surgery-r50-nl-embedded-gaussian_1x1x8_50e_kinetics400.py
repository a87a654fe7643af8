# The stock TSM-R50 non-local (embedded Gaussian) Kinetics-400 config with its backbone built by
# graph surgery: only the backbone type changes. TSMSurgeryResNet takes ResNetTSM's arguments;
# the non-local blocks are inserted after the same blocks, and with equal weights the outputs
# equal the stock model's. Its keys are plain ResNet keys plus `layerK.i.non_local_block.*`.
_base_ = [
    'mmaction::recognition/tsm/tsm_imagenet-pretrained-r50-nl-embedded-gaussian_8xb16-1x1x8-50e_kinetics400-rgb.py'
]

custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)

model = dict(backbone=dict(type='TSMSurgeryResNet'))
