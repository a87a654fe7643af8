# Shared settings of the demo configs: the embedded data (`tsm-surgery synth-data`), a small
# timm ResNet-18 at 64x64 px, CPU-sized batches and schedule. The three demo models differ only
# in their backbone (see tsn_*, tsm_* and tsm-uni_* in this folder).
#
# The clip length lives in one place, `num_segments` below: every pipeline samples that many
# frames, TSNHead averages over whatever the recognizer hands it, and the TSM configs' ClipLengthHook
# sets the backbone's shift length from the running pipeline.
#
# Data root: $TSM_DEMO_DATA, default work_dirs/demo/data (what `tsm-surgery demo` writes). Make
# the data with `tsm-surgery synth-data work_dirs/demo/data`.
_base_ = ['mmaction::_base_/default_runtime.py']

data_root = '{{$TSM_DEMO_DATA:work_dirs/demo/data}}'  # mmengine's environment-variable syntax
num_segments = 8
img_size = 64
num_classes = 6  # move_right/left, grow/shrink, rotate_ccw/cw (synth_data.CLASSES)

# A quarter-width ResNet-18 (2.8 M parameters), trained from scratch. zero_init_last=False: timm
# would zero the last norm of each residual branch, leaving every shifted branch silent at init.
backbone_2d = dict(type='timm.resnet18', pretrained=False, channels=(32, 64, 128, 256), stem_width=32,
                   zero_init_last=False)

model = dict(
    type='Recognizer2D',
    backbone=backbone_2d,
    cls_head=dict(
        type='TSNHead',
        num_classes=num_classes,
        in_channels=256,
        spatial_type='avg',
        consensus=dict(type='AvgConsensus', dim=1),  # the bag-of-frames average of TSN
        dropout_ratio=0.3,
        init_std=0.01,
        average_clips='prob'),
    data_preprocessor=dict(
        type='ActionDataPreprocessor',
        mean=[127.5, 127.5, 127.5],
        std=[64.0, 64.0, 64.0],
        format_shape='NCHW'))

dataset_type = 'VideoDataset'
# No flips: a horizontal flip turns move_right into move_left and rotate_cw into rotate_ccw.
train_pipeline = [
    dict(type='DecordInit'),
    dict(type='SampleFrames', clip_len=1, frame_interval=1, num_clips=num_segments),
    dict(type='DecordDecode'),
    dict(type='Resize', scale=(img_size, img_size), keep_ratio=False),
    dict(type='FormatShape', input_format='NCHW'),
    dict(type='PackActionInputs'),
]
test_pipeline = [
    dict(type='DecordInit'),
    dict(type='SampleFrames', clip_len=1, frame_interval=1, num_clips=num_segments, test_mode=True),
    dict(type='DecordDecode'),
    dict(type='Resize', scale=(img_size, img_size), keep_ratio=False),
    dict(type='FormatShape', input_format='NCHW'),
    dict(type='PackActionInputs'),
]


def _loader(split, pipeline, shuffle, batch_size):
    return dict(
        batch_size=batch_size,
        num_workers=1,  # decodes the next batch while the model runs (tsm-surgery demo: threads = cores - 1)
        persistent_workers=True,
        sampler=dict(type='DefaultSampler', shuffle=shuffle),
        dataset=dict(type=dataset_type, ann_file=f'{data_root}/{split}.txt',
                     data_prefix=dict(video=f'{data_root}/videos'), pipeline=pipeline,
                     test_mode=not shuffle))


train_dataloader = _loader('train', train_pipeline, True, 16)
val_dataloader = _loader('val', test_pipeline, False, 16)
test_dataloader = _loader('test', test_pipeline, False, 16)
del _loader

val_evaluator = dict(type='AccMetric')
test_evaluator = val_evaluator

max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_begin=1, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(optimizer=dict(type='AdamW', lr=2e-3, weight_decay=1e-4), clip_grad=dict(max_norm=20))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=1, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=max_epochs - 1, eta_min=1e-5, by_epoch=True, begin=1, end=max_epochs,
         convert_to_iter_based=True),
]

default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=1, max_keep_ckpts=1, save_best='acc/top1', rule='greater'))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
auto_scale_lr = dict(enable=False, base_batch_size=16)
