# TSM-R50 on Kinetics-400 with mixed precision: the surgery config, trained under autocast by
# mmengine's AmpOptimWrapper (float16 with a dynamic loss scale; 'bfloat16' on Ampere or newer
# GPUs needs no scaling). The shift and the online caches keep the dtype autocast gives each
# activation. mmengine 0.10.7 builds AmpOptimWrapper only where CUDA (or NPU/MLU/MUSA) exists:
# on a CPU-only machine this config loads and builds its model, but training it stops with
# mmengine's "only available training on gpu" assertion.
_base_ = ['./tsm_surgery_r50_1x1x8_50e_kinetics400.py']

optim_wrapper = dict(type='AmpOptimWrapper', dtype='float16', loss_scale='dynamic')
