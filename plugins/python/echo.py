"""`echo`: completes every task with its own parameters as the result.

The Python twin of plugins/echo: the smallest handler, and the one the benchmarks use to
measure what a Python plugin costs per task.
"""

from rebound_sdk import handler


@handler
def echo(task):
    return task.params
