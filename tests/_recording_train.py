"""``python _recording_train.py LOG_PREFIX train.py-args...``: train.py, with every record that a
packed *train* split hands out in this process appended to ``LOG_PREFIX.<process index>``
(one relative file name a line), so a test can see which process read what."""

import os
import runpy
import sys

from jaxvit.data import packed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record_reads(prefix: str) -> None:
    original = packed.PackedSource.__getitem__

    def getitem(self, index):
        if self.split == "train":
            import jax

            with open(f"{prefix}.{jax.process_index()}", "a") as f:
                f.write(self.read(index)[1] + "\n")
        return original(self, index)

    packed.PackedSource.__getitem__ = getitem


if __name__ == "__main__":
    _record_reads(sys.argv[1])
    sys.argv = [os.path.join(ROOT, "train.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
