"""Put this folder on PYTHONPATH to freeze a process at an exact moment: the first time it opens a file
whose path contains TRYON_TEST_PAUSE_OPEN, it stops itself (SIGSTOP); with TRYON_TEST_PAUSE_RANK set, only
the rank of that number does. A test then finds it stopped at that point, whatever the machine's speed, and kills or resumes
it. Python runs sitecustomize at start-up; the audit hook sees every open() the process makes."""
import os
import signal
import sys

_where, _rank = os.environ.get("TRYON_TEST_PAUSE_OPEN"), os.environ.get("TRYON_TEST_PAUSE_RANK")

if _where and _rank in (None, os.environ.get("RANK")):
    _done = []

    def _pause(event, args):
        if event == "open" and not _done and isinstance(args[0], (str, os.PathLike)) and _where in os.fspath(args[0]):
            _done.append(True)
            os.kill(os.getpid(), signal.SIGSTOP)

    sys.addaudithook(_pause)
