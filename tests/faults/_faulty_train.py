"""``python _faulty_train.py FAULT train.py-args...``: train.py with one injected fault.

FAULT is ``write_fails_at_save=N``: from the N-th checkpoint save on, every write
that grows a file past 8 KiB fails in the kernel (``RLIMIT_FSIZE``, with SIGXFSZ
ignored so ``write`` returns EFBIG), in Python and in tensorstore's C++ writers
alike: a disk that fills up in the middle of a save.
"""

import atexit
import os
import resource
import runpy
import signal
import subprocess
import sys

from jaxvit.training import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIMIT_BYTES = 8192


def _stderr_through_a_pipe() -> None:
    """The file-size limit applies to every file this process writes, its stderr log too, and
    background threads' tracebacks could fill those 8 KiB before the error that matters. So
    stderr goes through a pipe (not limited) to a ``cat`` started before the limit."""
    cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=sys.stderr.fileno())
    os.dup2(cat.stdin.fileno(), sys.stderr.fileno())

    def drain() -> None:  # after the final traceback: let cat finish the log before we exit
        sys.stderr.flush()
        os.close(sys.stderr.fileno())
        cat.stdin.close()
        cat.wait(timeout=30)

    atexit.register(drain)


def _fail_writes_from_save(n: int) -> None:
    original = checkpointing.Checkpointer.save
    calls = 0

    def save(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            self.wait()  # earlier saves (and the keep-best one) finish on a healthy disk
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, resource.RLIM_INFINITY))
            print(
                f"fault: writes past {LIMIT_BYTES} bytes fail from save {n} on", file=sys.stderr, flush=True
            )
        return original(self, *args, **kwargs)

    checkpointing.Checkpointer.save = save


if __name__ == "__main__":
    fault, args = sys.argv[1], sys.argv[2:]
    name, _, value = fault.partition("=")
    if name != "write_fails_at_save":
        sys.exit(f"unknown fault {fault!r}")
    _stderr_through_a_pipe()
    _fail_writes_from_save(int(value))
    sys.argv = [os.path.join(ROOT, "train.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")
