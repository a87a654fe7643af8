"""Adapters that import third-party libraries (MMAction2/MMEngine, timm).

Installed as ``tsm_surgery.integrations``; the core package never imports them.
"""
