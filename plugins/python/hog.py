"""`hog`: takes memory, for the sandbox's memory-cap tests.

The Python twin of plugins/hog. Parameters: `mb`, how many MiB to allocate and write to
(one MiB at a time, each kept until the handler returns). Under the cap it returns
`{"held_mb": mb}`; over it, the host stops the instance at the grow that would cross the cap.
"""

from rebound_sdk import handler

MIB = 1024 * 1024


@handler
def hog(task):
    held = []
    for i in range(task.param("mb")):
        # Filled, not only reserved, so every page is really in use.
        held.append(bytes([i % 251 + 1]) * MIB)
    return {"held_mb": len(held), "checksum": sum(chunk[-1] for chunk in held)}
