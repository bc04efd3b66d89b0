"""What chat `stop` strings cost the front end (api/chat.py StopCutter): the
time to cut a streamed answer with the worst stop a client may send (1,024
characters, every piece of the answer a possible start of it) against the same
answer with four ordinary stops, measured alternately in one run.

    python bench/stop_match.py            # 2,000 pieces of 4 characters
    python bench/stop_match.py --quick    # for the smoke test

Linear matching keeps the ratio small whatever the stop's length; the matching
before issue 22 grew with the square of it (a 1,000,000-character stop held a
front end for 18 s).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from api.chat import StopCutter  # noqa: E402
from api.chat_schemas import MAX_STOP_CHARS, MAX_STOP_SEQUENCES  # noqa: E402

ORDINARY = ["\n\n", "END", "User:", "###"]


def cut_seconds(stops: list[str], pieces: list[str]) -> float:
    started = time.perf_counter()
    cutter = StopCutter(stops)
    for piece in pieces:
        cutter.feed(piece)
    cutter.flush()
    return time.perf_counter() - started


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pieces", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    pieces, rounds = (200, 3) if args.quick else (args.pieces, args.rounds)
    answer = ["a" * 4] * pieces
    worst = ["a" * (MAX_STOP_CHARS - 1) + chr(98 + i) for i in range(MAX_STOP_SEQUENCES)]  # never complete
    times = {"ordinary": [], "worst": []}
    for _ in range(rounds):  # alternately, so a busy machine slows both alike
        times["ordinary"].append(cut_seconds(ORDINARY, answer))
        times["worst"].append(cut_seconds(worst, answer))
    best = {name: min(values) for name, values in times.items()}
    result = {"pieces": pieces, "ordinary_ms": best["ordinary"] * 1e3, "worst_ms": best["worst"] * 1e3,
              "ratio": best["worst"] / best["ordinary"]}
    print(f"{pieces} pieces of 4 characters: four ordinary stops {result['ordinary_ms']:.2f} ms, "
          f"four of {MAX_STOP_CHARS} characters that every piece may start {result['worst_ms']:.2f} ms "
          f"({result['ratio']:.1f}x)")
    return result


if __name__ == "__main__":
    main()
