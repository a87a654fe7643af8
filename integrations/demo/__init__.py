"""The main job on embedded data: synthetic temporal-reasoning videos, TSN against TSM.

* :mod:`.synth_data`: the dataset generator (``synth-data``);
* :mod:`.pipeline`: train and test the demo configs, then stream (``demo``);
* :mod:`.report`: what the demo shows (its table, curves and a streamed video).
"""
