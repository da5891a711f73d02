"""Hands benchmark: Provision, Execute of `true` and of a small file edit through gRPC into a warm sandbox, and
16 sandboxes working at once. Runs a real hands process (bwrap backend) and drives it from this process.

    python bench/hands_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import service, summary_ms, table
from hands.client import HandsClient


async def timed(samples: list[float], work: object) -> None:
    started = time.perf_counter()
    await work  # type: ignore[misc]
    samples.append(time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples, for a smoke check")
    args = parser.parse_args()
    count = 30 if args.quick else 200
    with tempfile.TemporaryDirectory() as tmp, service("hands", "--work-root", str(Path(tmp) / "sb")) as address:
        async with HandsClient.connect(address) as hands:
            provision: list[float] = []
            sandboxes = []
            for _ in range(min(count, 50)):
                started = time.perf_counter()
                sandboxes.append((await hands.provision()).id)
                provision.append(time.perf_counter() - started)
            warm = sandboxes[0]
            await hands.execute(warm, execution_id="warm", name="bash", input={"command": "echo line > f.txt"})
            true_calls: list[float] = []
            edits: list[float] = []
            for n in range(count):
                await timed(
                    true_calls, hands.execute(warm, execution_id=f"t{n}", name="bash", input={"command": "true"})
                )
                await timed(
                    edits,
                    hands.execute(
                        warm,
                        execution_id=f"e{n}",
                        name="str_replace_based_edit_tool",
                        input={
                            "command": "str_replace",
                            "path": "/workspace/f.txt",
                            "old_str": "line",
                            "new_str": "line",
                        },
                    ),
                )
            table(
                "Hands, bwrap backend, through gRPC",
                [
                    (f"Provision ({len(provision)})", summary_ms(provision)),
                    (f"Execute `true`, warm shell ({count})", summary_ms(true_calls)),
                    (f"Execute str_replace edit ({count})", summary_ms(edits)),
                ],
            )
            parallel = sandboxes[:16]
            calls: list[float] = []
            started = time.perf_counter()

            async def worker(sandbox: str, w: int) -> None:
                for n in range(count // 4):
                    await timed(
                        calls,
                        hands.execute(
                            sandbox,
                            execution_id=f"p{w}-{n}",
                            name="bash",
                            input={"command": "echo $RANDOM > r.txt; cat r.txt"},
                        ),
                    )

            await asyncio.gather(*(worker(s, w) for w, s in enumerate(parallel)))
            elapsed = time.perf_counter() - started
            table(
                "16 sandboxes at once",
                [
                    ("calls", f"{len(calls)} in {elapsed:.2f} s = {len(calls) / elapsed:.0f} calls/s"),
                    ("latency", summary_ms(calls)),
                ],
            )
            for sandbox in sandboxes:
                await hands.destroy(sandbox)


if __name__ == "__main__":
    asyncio.run(main())
