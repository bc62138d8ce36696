"""The data pipeline glue as the trainer drives it: sampler + DataLoader (workers, drop_last) + resume."""
import pytest
from torch.utils.data import DataLoader

from dualloop.data import MixtureSampler


class TrainerLoop:
    """The data part of dualloop/train/trainer.py: drop_last batches, `consumed` counts the samples handed to the
    model (not those the workers prefetched), StopIteration turns the epoch over, a checkpoint saves
    state_dict(consumed=...) and a resumed run loads it and starts counting from there."""

    def __init__(self, length, world, rank, batch, workers, state=None):
        self.sampler = MixtureSampler(length, num_replicas=world, rank=rank, seed=4)
        self.loader = DataLoader(list(range(length)), batch_size=batch, sampler=self.sampler, collate_fn=list,
                                 num_workers=workers, drop_last=True, prefetch_factor=2 if workers else None)
        self.consumed, self.it = 0, None
        if state is not None:
            self.sampler.load_state_dict(state)
            self.consumed = state["position"]

    def next_batch(self):
        while True:
            if self.it is None:
                self.it = iter(self.loader)
            try:
                batch = next(self.it)
            except StopIteration:
                self.it = None
                self.sampler.set_epoch(self.sampler.epoch + 1)
                self.consumed = 0
                continue
            self.consumed += len(batch)
            return self.sampler.epoch, batch

    def checkpoint(self):
        return self.sampler.state_dict(consumed=self.consumed)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_stream_also_at_an_epoch_boundary(workers):
    # 40 samples on 2 ranks, batch 4: 5 batches per rank and epoch. A checkpoint after 5 batches has consumed the
    # whole epoch (position == len(sampler)); the resumed run must go on with epoch 1, not replay epoch 0.
    steps = 8
    for rank in range(2):
        full = TrainerLoop(40, 2, rank, 4, 0)
        expected = [full.next_batch() for _ in range(steps)]
        for k in ([2, 5] if workers else range(1, steps)):
            run = TrainerLoop(40, 2, rank, 4, workers)
            got = [run.next_batch() for _ in range(k)]  # workers have prefetched batches beyond these
            resumed = TrainerLoop(40, 2, rank, 4, workers, state=run.checkpoint())
            got += [resumed.next_batch() for _ in range(steps - k)]
            assert got == expected, f"rank {rank}, checkpoint after {k} batches: epochs {[e for e, _ in got]}"


def test_restored_complete_epoch_yields_nothing_but_a_finished_one_starts_over():
    s = MixtureSampler(12, num_replicas=3, rank=1, seed=2)
    s.set_epoch(5)
    full = list(s)
    restored = MixtureSampler(12, num_replicas=3, rank=1, seed=2)
    restored.load_state_dict({"epoch": 5, "position": len(full)})
    restored.set_epoch(5)  # re-entering the same epoch keeps the position
    assert list(restored) == []  # the checkpoint had consumed all of epoch 5
    assert list(restored) == full  # iterated again without set_epoch: the same order from the start
    assert list(s) == full


def test_negative_seed_shuffles_deterministically():
    # data.seed is any int (the readers' replacement hash masks it to 64 bits); numpy's seeding refused negatives
    order = list(MixtureSampler(30, seed=-3))
    assert sorted(order) == list(range(30))
    assert order == list(MixtureSampler(30, seed=-3)) != list(MixtureSampler(30, seed=3))
