"""What the training loop reads: shuffled index batches over a split, and the one
preprocessing step (uint8 images to normalised floats on the device)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class Preprocess:
    """uint8 batch -> normalised float batch on the device."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        channels_last: bool = False,
    ) -> None:
        shape = (1, len(mean), 1, 1)
        # Fold /255 into the affine map: x * scale + shift.
        self.scale = (1.0 / (255.0 * torch.tensor(std))).view(shape).to(device)
        self.shift = (-torch.tensor(mean) / torch.tensor(std)).view(shape).to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.float(), self.scale)
        return x.contiguous(memory_format=self.memory_format)


def batches_per_epoch(examples: int, batch_size: int) -> int:
    """Mini-batches in one epoch over ``examples`` (the last one may be short)."""
    return (examples + batch_size - 1) // batch_size


class BatchStream:
    """Shuffled mini-batches ``(example indices, uint8 images, labels)`` of one index set.

    ``images`` and ``labels`` may live on the GPU; only the permutation is made on the
    CPU, from a generator seeded by (seed, epoch), so every run sees the same order.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.images, self.labels = images, labels
        self.indices = indices.to(images.device)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle

    def __len__(self) -> int:
        return batches_per_epoch(len(self.indices), self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The example indices of ``epoch`` in the order they are visited."""
        if not self.shuffle:
            return self.indices
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.indices[torch.randperm(len(self.indices), generator=gen).to(self.indices.device)]

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of ``epoch``, from batch ``skip`` on (a resumed run's position)."""
        indices = self.order(epoch)
        for start in range(skip * self.batch_size, len(indices), self.batch_size):
            idx = indices[start : start + self.batch_size]
            yield idx, self.images[idx], self.labels[idx]
