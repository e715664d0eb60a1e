"""Where the commit-to-receipt time of user-targeted events goes, hop by hop.

    .venv/bin/python -m bench.pipeline [--rate 5000] [--users 10000] [--seconds 10]

The `targeted` scenario's setup without the load client: a fresh database (`UserstreamTarget`,
`--users` members), `userstream relay` and `userstream serve`, and the suite's rate driver
committing `--rate` user events per second, the events due every 10 ms in one transaction.
Alongside, this process reads the bus as a gateway does (`RedisBus.read`, its own connection)
and takes, for every event, `receipt - committed_at` (the commit trigger's `clock_timestamp()`):
the commit -> NOTIFY -> relay read -> `XADD` -> `XREAD` hops. Printed with the publish call's
own duration (insert and commit of one tick's rows, which the `targeted` scenario's latency
includes, its `ts` being taken before the call).
"""

import argparse
import asyncio
import contextlib
import statistics
import time

from bench.scenarios import RateDriver
from bench.targets.userstream import UserstreamTarget
from sync.bus_redis import RedisBus
from tests.services import PgServer, postgres_server, redis_server


def quantiles_ms(samples: list[float]) -> str:
    """`p50 / p99 / max` of `samples` (seconds) in ms."""
    if len(samples) < 2:
        return "no samples"
    cuts = statistics.quantiles(samples, n=100)
    return f"p50 {cuts[49] * 1e3:.2f} / p99 {cuts[98] * 1e3:.2f} / max {max(samples) * 1e3:.2f} ms"


class TimedDriver(RateDriver):
    """The suite's rate driver, recording each publish call's duration (s)."""

    calls: list[float]

    async def run(self, stop: asyncio.Event) -> None:
        """As `RateDriver.run`, timing each `target.publish` call."""
        self.calls = []
        publish = self.target.publish

        async def timed(*args: object) -> None:
            began = time.perf_counter()
            await publish(*args)  # type: ignore[arg-type]
            self.calls.append(time.perf_counter() - began)

        self.target.publish = timed  # type: ignore[method-assign]
        try:
            await super().run(stop)
        finally:
            self.target.publish = publish  # type: ignore[method-assign]


async def measure(args: argparse.Namespace, pg: PgServer, redis_url: str) -> None:
    """Start the target, read the bus while the driver publishes, print the hops."""
    target = UserstreamTarget(pg, redis_url)
    await target.start(cpu="0", users=args.users, scope="targeted")
    bus = RedisBus(redis_url, target.prefix)
    hops: list[float] = []
    try:
        start_at = await bus.last_position()

        async def read() -> None:
            async for batch in bus.read(start_at):
                now = time.time()
                hops.extend(now - event.committed_at for event in batch.events)

        reader = asyncio.create_task(read())
        stop = asyncio.Event()
        driver = TimedDriver(target, "targeted", args.rate, args.users)
        publishing = asyncio.create_task(driver.run(stop))
        await asyncio.sleep(args.seconds)
        stop.set()
        await publishing
        await asyncio.sleep(1.0)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        print(f"published {driver.sent} events in {len(driver.calls)} transactions")
        print(f"publish call (insert + commit):  {quantiles_ms(driver.calls)}")
        print(f"commit -> bus read (relay hop):  {quantiles_ms(hops)}")
    finally:
        await bus.close()
        await target.stop()


def main() -> None:
    """Parse the options and measure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=5000, help="events per second")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with postgres_server() as pg, redis_server() as redis_url:
        asyncio.run(measure(args, pg, redis_url))


if __name__ == "__main__":
    main()
