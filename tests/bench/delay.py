"""A TCP relay that delays every byte by a fixed time in each direction, for the benchmarks:
it puts a distant peer on 127.0.0.1 (the kernel's netem is not available everywhere).

    python3 tests/bench/delay.py LISTEN_PORT TARGET_PORT ONE_WAY_SECONDS
"""
import asyncio
import sys
import time

LISTEN, TARGET, DELAY = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])


async def pump(reader, writer):
    queue = asyncio.Queue()

    async def send():
        while True:
            sent_at, data = await queue.get()
            if data is None:
                writer.close()
                return
            wait = sent_at + DELAY - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.create_task(send())
    while True:
        data = await reader.read(262144)
        queue.put_nowait((time.monotonic(), data or None))
        if not data:
            break
    await sender


async def handle(reader, writer):
    up_reader, up_writer = await asyncio.open_connection("127.0.0.1", TARGET)
    await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True)


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", LISTEN)
    await server.serve_forever()


asyncio.run(main())
