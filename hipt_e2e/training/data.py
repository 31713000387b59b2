"""Feeding training loops from shard streams: an endless per-process batch source that knows its position
(a resumed run continues at the same sample), and seeds derived from the run seed and a batch's place in the
global batch (no random state to save; the same draws whatever the number of processes).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from hipt_e2e.data.samples import collate
from hipt_e2e.errors import UserError


def derived_seed(*key: int) -> int:
    """A 64-bit seed that depends only on the integers in ``key`` (e.g. run seed, step, position)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])


class EpochBatches(Iterator[dict]):
    """Endless full batches of a stream, pass after pass (``set_epoch`` each time). ``position`` = (stream
    epoch, batches taken in it); a saved position is reached by re-reading that epoch's earlier batches."""

    def __init__(self, stream: IterableDataset, batch_size: int, workers: int, position: tuple[int, int] = (0, 0),
                 pin_memory: bool = False) -> None:
        self.stream = stream
        self.loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                                 drop_last=True, pin_memory=pin_memory)
        self.epoch, self.taken = position
        self._iterator: Iterator[dict] | None = None

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.taken

    def _start_epoch(self, skip: int) -> None:
        self.stream.set_epoch(self.epoch)
        self._iterator = iter(self.loader)
        for _ in range(skip):
            next(self._iterator)

    def __next__(self) -> dict:
        if self._iterator is None:
            self._start_epoch(skip=self.taken)
        batch = next(self._iterator, None)
        if batch is None:  # end of this pass over the shards: start the next
            self.epoch, self.taken = self.epoch + 1, 0
            self._start_epoch(skip=0)
            batch = next(self._iterator, None)
            if batch is None:
                raise UserError(
                    f"this process got no full batch of {self.loader.batch_size} from its shards; a shard set "
                    "needs at least one shard per process and DataLoader worker, with enough samples (rebuild "
                    "it with a smaller --shard-bytes, or lower the batch size or the workers)")
        self.taken += 1
        return batch
