"""Graceful stop on SIGTERM and SIGINT, the signals schedulers send before preemption.

The first signal only sets a flag. The loop finishes its current step, writes a
checkpoint and exits non-zero. A second signal restores the default handler and
re-sends itself, which ends the process at once.
"""

from __future__ import annotations

import logging
import os
import signal

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """The first stop signal received, shared by all processes on request."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        for number in HANDLED_SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        if self.signal_number is not None:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self.signal_number = number
        logger.warning(
            "Received %s: finishing the current step and writing a checkpoint. Send it again to exit at once.",
            signal.Signals(number).name,
        )

    def should_stop(self, accelerator: Accelerator) -> bool:
        """Return True on every process when any process received a signal.

        Processes must agree, because saving a checkpoint is a collective operation.
        """
        local = self.signal_number is not None
        if accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    @property
    def exit_code(self) -> int:
        """Return the shell's code for death by this signal (143 for SIGTERM, 130 for SIGINT)."""
        return 128 + (self.signal_number or signal.SIGTERM)
