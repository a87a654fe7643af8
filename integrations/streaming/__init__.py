"""Running a TSM network online: sources, the frame loop, what is done with its outputs (docs/live.md).

* :mod:`.sources`: files, capture devices and network URLs, each read by a thread, with the
  real-time drop policies and reconnection.
* :mod:`.engine`: the :class:`~.engine.StepEngine` protocol (``init_state``, ``step``) that the
  loop calls once per tick, and :class:`~.engine.TorchEngine` for a :class:`tsm_surgery.OnlineTSM`.
* :mod:`.batch`: :class:`~.batch.StreamBatch`, many streams in one batched step (add, remove,
  reset, feed, step, results).
* :mod:`.post`: class mask, logit averages, hysteresis and events.
* :mod:`.annotate`: the annotated video.
* :mod:`.loop`: :class:`~.loop.FrameLoop`, sources through the batch to the outputs, with
  latency per part and real-time lag.
* :mod:`.stream`: decoding a file, preprocessing, the models of ``tsm-surgery stream``.
* :mod:`.calibration`: decoded clips (a video directory, a data config, the demo videos) for int8 calibration.
"""
