"""The verbs of the ``tsm-surgery`` command, one module each.

Every module provides ``add_arguments(parser)`` and ``run(args) -> int``; the dispatcher
(:mod:`tsm_surgery.cli`) imports a verb's module only when that verb runs.
"""
