import asyncio
import asyncpg
from bench import writers as w
from sync.outbox import _SELECT

async def main(server):
    async with w.bench_database(server, "trigger") as dsn:
        await w.preload(dsn, 200_000, 1)
        conn = await asyncpg.connect(dsn)
        await conn.execute("VACUUM ANALYZE outbox")
        xid = await conn.fetchval("SELECT xid FROM outbox WHERE seq = 500")
        for q, args in ((f"{_SELECT} WHERE seq > $1 ORDER BY seq LIMIT $2", (500, 500)),
                        (f"{_SELECT} WHERE seq > $1 AND xid = $2 ORDER BY seq", (500, xid))):
            plan = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + q, *args)
            print("\n".join(r[0] for r in plan)); print()
        await conn.close()

if __name__ == "__main__":
    with w.durable_logical_server() as server:
        asyncio.run(main(server))
