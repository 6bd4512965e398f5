"""Run a command beside N processes that keep a core each busy for the whole run, as a shared CI machine
is: ``python tests/helpers/busy.py 2 -- python -m pytest -q``. Exits with the command's status; the busy
processes end with it."""
import multiprocessing
import subprocess
import sys
import time


def spin() -> None:
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit("usage: busy.py N -- COMMAND...")
    busy = [multiprocessing.Process(target=spin, daemon=True) for _ in range(int(sys.argv[1]))]
    for p in busy:
        p.start()
    start = time.time()
    try:
        code = subprocess.call(sys.argv[3:])
    finally:
        for p in busy:
            p.terminate()
    print(f"busy.py: {len(busy)} busy process(es) beside the command for {time.time() - start:.0f} s; exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
