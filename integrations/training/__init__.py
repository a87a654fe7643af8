"""Training and evaluating MMAction2 configs with mmengine's Runner (``train``, ``test``)."""
