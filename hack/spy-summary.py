"""Summarize a py-spy raw profile (`py-spy record -f raw`, as hack/serve-profile.py writes) by thread.

For each of the server's threads (found by the function each runs: the batcher, its finisher, the request
reader, the writer, a worker's event loop), the share of its samples under each call path a few frames below
that function. With a wall profile (`--idle`, serve-profile's WALL=1) the shares are of wall time, waiting
included; with `--gil`, of the time the thread held the GIL.

    python hack/spy-summary.py OUT/wall.raw [depth, default 3] [minimum share in %, default 1.5]
"""

from __future__ import annotations

import collections
import sys

THREADS = (
    "Batcher._loop",
    "Batcher._finish_loop",
    "Hub._read",
    "_Writer._loop",
    "BaseEventLoop.run_forever",
    "Runner.run",  # uvloop's loop (C: no run_forever frame); asyncio's has run_forever inside it
)


def main() -> None:
    path = sys.argv[1]
    depth = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    floor = float(sys.argv[3]) if len(sys.argv) > 3 else 1.5
    totals: collections.Counter[str] = collections.Counter()
    paths: collections.Counter[tuple[str, str]] = collections.Counter()
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            names = [frame.split(" (")[0] for frame in stack.split(";")]
            thread = next((n for n in reversed(names) if n in THREADS), None)  # the innermost
            if thread is None:
                continue
            i = names.index(thread)
            totals[thread] += int(count)
            paths[thread, ";".join(names[i + 1 : i + 1 + depth]) or "(in the function itself)"] += int(count)
    for thread, total in totals.most_common():
        print(f"== {thread}: {total} samples")
        for (t, where), n in paths.most_common():
            if t == thread and 100 * n / total >= floor:
                print(f"  {100 * n / total:5.1f} %  {where}")


if __name__ == "__main__":
    main()
