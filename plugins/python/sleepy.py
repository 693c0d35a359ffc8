"""`sleepy`: keeps the CPU busy for a given time without ever yielding to the host.

The Python twin of plugins/sleepy. Parameters: `ms` (default 100), how long to spin. It
reports its progress as it goes and never checks `cancelled()`, so only the host's epoch
deadline or fuel budget can stop it early. With `"sleep": true` it blocks in a WASI sleep
(`time.sleep`) instead of spinning.
"""

import time

from rebound_sdk import handler, set_progress


@handler
def sleepy(task):
    ms = task.param("ms", 100)
    if task.param("sleep", False):
        time.sleep(ms / 1000)
        return {"slept_ms": ms, "gpu": task.gpu}
    started = time.monotonic()
    spins = 0
    reported = 0
    while (elapsed := (time.monotonic() - started) * 1000) < ms:
        percent = int(elapsed * 100 / max(ms, 1))
        if percent >= reported + 10:
            reported = percent
            set_progress(percent)
        for i in range(1000):
            spins += i
    set_progress(100)
    return {"spun_ms": ms, "spins": spins, "gpu": task.gpu}
