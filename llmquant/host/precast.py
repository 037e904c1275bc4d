"""Cast the large tensors outside the decoder blocks while the model is being set up.

A run without calibration spends its first seconds on one core building the model's skeleton
(mostly importing its transformers modeling code), and its last ones writing the embeddings and
the head, cast to the output dtype. `OutsideCast` does the casting on a background thread during
the setup, into a scratch file beside the output, so that the final shards only copy those bytes
file to file (a kernel copy). Which tensors lie outside the blocks is known only once the skeleton
is built, so it guesses by name (no ``.N.`` layer index); a tensor it guessed wrong is simply not
used, one it missed is cast as before. The bytes are the same either way.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
from pathlib import Path

import torch

from llmquant.host.checkpoint import Checkpoint
from llmquant.io.shards import cast_stream

__all__ = ["OutsideCast"]

log = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.\d+\.")
MIN_BYTES = 16 * 2**20  # smaller tensors are cast faster than a thread starts


class OutsideCast:
    """Cast `checkpoint`'s large float tensors outside the blocks to `target` on a background thread,
    into ``folder/outside.bin``. `take` waits and returns ``{key: (offset, nbytes)}``; `close` stops the
    thread and removes the folder."""

    def __init__(self, checkpoint: Checkpoint, target: torch.dtype, folder: Path) -> None:
        self.folder, self.path, self.target = folder, folder / "outside.bin", target
        self.keys = [key for key, info in checkpoint.infos.items()
                     if not _LAYER_INDEX.search(key) and info.dtype.is_floating_point and info.dtype != target
                     and info.nbytes >= MIN_BYTES]
        self.cast: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.keys:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            self._thread = threading.Thread(target=self._run, args=(checkpoint, target), name="llmquant-outside-cast", daemon=True)
            self._thread.start()

    def _run(self, checkpoint: Checkpoint, target: torch.dtype) -> None:
        try:
            with open(self.path, "wb") as out:
                for key in self.keys:
                    info = checkpoint.infos[key]
                    offset = out.tell()
                    if not cast_stream(info.path, info.start, info.nbytes, info.dtype, target, out, self._stop.is_set):
                        return
                    out.flush()
                    self.cast[key] = (offset, out.tell() - offset)
        except OSError as exc:  # a full disk, say: the final shards cast these tensors themselves
            log.debug("casting the tensors outside the blocks ahead failed: %s", exc)

    def take(self) -> dict[str, tuple[int, int]]:
        """Wait for the thread and return the tensors it cast: key -> (offset, nbytes) in `path`."""
        if self._thread is not None:
            self._thread.join()
        return dict(self.cast)

    def close(self) -> None:
        """Stop the thread (at its next chunk) and remove the scratch folder."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        shutil.rmtree(self.folder, ignore_errors=True)
