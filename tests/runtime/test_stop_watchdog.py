"""The bound on a node's stop: a hung shutdown is named and ended, a finished one is not."""
import asyncio
import os
import signal

from e3.runtime.cli import stop_signals
from e3.runtime.stop_watchdog import EXIT_CODE, StopWatchdog


async def _never_done(gate: asyncio.Event) -> None:
    await gate.wait()


async def test_a_stop_that_hangs_is_ended_and_says_what_was_running(caplog):
    exits, gate = [], asyncio.Event()
    stuck = asyncio.create_task(_never_done(gate), name="stuck-shutdown-step")
    watchdog = StopWatchdog(timeout_s=0.05, exit=exits.append)
    watchdog.arm()
    await asyncio.sleep(0.2)
    assert exits == [EXIT_CODE]
    assert "did not stop within 0 s" in caplog.text and "_never_done" in caplog.text, caplog.text
    gate.set()
    await stuck


async def test_a_stop_that_finishes_in_time_is_left_alone():
    exits = []
    watchdog = StopWatchdog(timeout_s=0.05, exit=exits.append)
    watchdog.arm()
    watchdog.disarm()
    await asyncio.sleep(0.15)
    assert exits == []


async def test_the_first_stop_signal_arms_the_watchdog_and_later_ones_change_nothing():
    exits = []
    stop = stop_signals(StopWatchdog(timeout_s=0.1, exit=exits.append))
    loop = asyncio.get_running_loop()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(stop, 5) == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)        # a second Ctrl-C: ignored, not a second timer
        await asyncio.sleep(0.3)
        assert exits == [EXIT_CODE]
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        loop.remove_signal_handler(signal.SIGTERM)
