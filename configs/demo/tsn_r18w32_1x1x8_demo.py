# TSN: the plain 2D ResNet-18 with average consensus. Sees a bag of frames, so it cannot tell
# the two classes of a time-reversal pair apart (expect ~50% within each pair).
_base_ = ['./_base_demo.py']
