"""The one clock type every component takes, so a test can inject a fake one.

Unix seconds (``time.time``) everywhere, for waits in a queue as for timestamps kept
in the state store: image and video schedulers compare the same kind of number, and a
job's ``created_at`` written by a router means the same to the scheduler that
expires it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
system_clock: Clock = time.time
