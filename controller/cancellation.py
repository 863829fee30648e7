"""Cancellation that library code swallowed is raised again.

On Python 3.11 `asyncio.wait_for` returns the awaited result instead of raising
CancelledError when the result and the cancellation arrive in the same loop iteration
(CPython gh-86296; 3.12 rebuilt wait_for on `asyncio.timeout`). A task whose cancellation
is lost that way runs on as if nothing happened: a `while True` loop then never stops,
and neither does the process that waits for it. Our own code uses `asyncio.timeout()`;
the libraries we call (aiomqtt for every MQTT acknowledgement, pyasic, openleadr) use
`wait_for`, so calls into them go through `propagate_lost_cancel()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def propagate_lost_cancel() -> Iterator[None]:
    """Raise CancelledError if this task was cancelled inside the block and it ended otherwise.

    `Task.cancelling()` counts cancellation requests until someone calls `uncancel()`
    (only `asyncio.timeout` and `TaskGroup` do, for the requests they made themselves).
    A block that returned, or raised something else, while the count rose has swallowed
    a request meant for the task: it is delivered here.
    """
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    try:
        yield
    except asyncio.CancelledError:
        raise
    except Exception as e:
        if task is not None and task.cancelling() > before:
            raise asyncio.CancelledError from e  # the stop wins over the error it caused
        raise
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError
