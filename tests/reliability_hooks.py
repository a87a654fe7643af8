"""Test-only mmengine hooks for tests/test_reliability.py, imported by tiny configs through custom_imports.

Both act only when their environment variable is set, so the same config trains normally otherwise.
"""

import os
import signal
import time

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class KillAtIterHook(Hook):
    """SIGKILLs the training process after iteration ``$TSM_TEST_KILL_AT_ITER`` (1-based): a real kill."""

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        at = os.environ.get("TSM_TEST_KILL_AT_ITER")
        if at and runner.iter + 1 == int(at):
            os.kill(os.getpid(), signal.SIGKILL)


@HOOKS.register_module()
class SleepBeforeTrainHook(Hook):
    """Sleeps ``$TSM_TEST_SLEEP_BEFORE_TRAIN`` seconds before training: a run that holds its work dir."""

    def before_train(self, runner):
        time.sleep(float(os.environ.get("TSM_TEST_SLEEP_BEFORE_TRAIN", "0")))
