"""Measurements of the method: benchmarks, model coverage, ablations, efficiency.

* :mod:`.bench`: the shift's cost against the 2D network and the peers (``BENCHMARKS.md``);
* :mod:`.coverage`: which timm/torchvision models convert, stream and agree (``COVERAGE.md``);
* :mod:`.ablate` with :mod:`.ablate_report`: shift proportion x placement;
* :mod:`.efficiency`: TSM against MMAction2's stock 3D networks.
"""
