# Uni-directional TSM: channels move only forward in time (frame t reads frame t-1), so the
# network is causal and runs online, one frame at a time (tsm_surgery.to_online).
_base_ = ['./tsm_r18w32_1x1x8_demo.py']

model = dict(backbone=dict(direction='uni'))
