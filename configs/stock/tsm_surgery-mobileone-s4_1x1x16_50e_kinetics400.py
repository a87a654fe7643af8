# The stock TSM MobileOne-S4 Kinetics-400 config with its backbone built by graph surgery: only
# the backbone type changes. Each block's input is shifted, as MobileOneTSM does, so the blocks
# still reparameterise (add `deploy=True` for the fused form, as the stock deploy config does).
# The stock config leaves the backbone at num_segments=8 under a 16-frame pipeline: MMAction2's
# own train script keeps 8 (the shift then works within groups of 8, as the stock model does);
# `tsm-surgery train` sets num_segments from the pipeline (16), for the stock type as well.
_base_ = ['mmaction::recognition/tsm/tsm_imagenet-pretrained-mobileone-s4_8xb16-1x1x16-50e_kinetics400-rgb.py']

custom_imports = dict(imports=['tsm_surgery.integrations.mmaction'], allow_failed_imports=False)

model = dict(backbone=dict(type='TSMSurgeryMobileOne'))
