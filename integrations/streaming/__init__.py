"""Running a TSM network online: sources, the frame loop, what is done with its outputs.

* :mod:`.stream`: decode a video, preprocess each frame, run the online step, print top-k.
* :mod:`.calibration`: decoded clips (a video directory, a data config, the demo videos) for int8 calibration.
"""
