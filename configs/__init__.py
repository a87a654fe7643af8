"""MMAction2 configs, installed as ``tsm_surgery.configs`` package data.

Read them with ``importlib.resources.files("tsm_surgery.configs")``; ``demo/`` holds the
configs ``tsm-surgery demo`` trains, ``stock/`` stock MMAction2 configs carried over.
"""
