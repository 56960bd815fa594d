"""Augmented views of an image: random crop (zero padding) and horizontal flip.

With padding ``p`` an image has ``(2p+1)**2 * 2`` distinct views (162 for p=4), so a
view is just an integer id, rendered by :func:`apply_views` on whole uint8 batches
on the device. Ordinary augmentation (:class:`RandomViews`) draws any view at every
step. Distillation with augmentation wants the teacher's logits for the very view
the student sees ("consistent teaching", Beyer et al. 2022) without a teacher forward
pass per step: :class:`CachedViews` gives every image a fixed, seeded order of its
views (:func:`view_orders`) and draws each step's view from the first ``K`` of them,
whose teacher logits the store caches (see :meth:`kd.teacher.TeacherStore.view_logits`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PADDING = 4


def view_count(padding: int = PADDING) -> int:
    """Distinct crop + flip views of one image: 162 for padding 4."""
    return (2 * padding + 1) ** 2 * 2


def apply_views(images: torch.Tensor, views: torch.Tensor, padding: int = PADDING) -> torch.Tensor:
    """Render view ``views[i]`` of ``images[i]`` (uint8 ``[n, c, h, w]``).

    View id ``v`` is flip ``v % 2``, then the crop's column offset ``(v // 2) % (2p+1)``
    and row offset ``v // (2 (2p+1))`` into the zero-padded image.
    """
    n, _, h, w = images.shape
    device = images.device
    views = views.to(device=device, dtype=torch.int64)
    side = 2 * padding + 1
    flip = (views % 2).bool()
    dx = (views // 2) % side
    dy = views // (2 * side)
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h, device=device)  # [n, h]
    cols = dx[:, None] + torch.arange(w, device=device)  # [n, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def view_orders(num_images: int, seed: int, padding: int = PADDING) -> torch.Tensor:
    """A seeded random order of all views for every image, int16 ``[num_images, views]``.

    The first ``K`` columns are an image's ``K`` cached views, so the views for a
    smaller ``K`` are a prefix of those for a larger one and share their cache.
    """
    gen = torch.Generator().manual_seed(seed)
    orders = torch.empty(num_images, view_count(padding), dtype=torch.int16)
    for start in range(0, num_images, 8192):  # bounded memory for large sets
        stop = min(num_images, start + 8192)
        orders[start:stop] = torch.rand(stop - start, view_count(padding), generator=gen).argsort(1).to(torch.int16)
    return orders


class RandomViews:
    """Ordinary augmentation: a uniformly random view per example and step."""

    def __init__(self, seed: int, padding: int = PADDING) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.padding = padding

    def draw(self, idx: torch.Tensor) -> tuple[torch.Tensor, None]:
        """This step's view id per example (and no slot: nothing is cached per view)."""
        return torch.randint(0, view_count(self.padding), (len(idx),), generator=self.generator), None

    def __call__(self, idx: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        views, _ = self.draw(idx)
        return apply_views(images, views, self.padding), None


class CachedViews:
    """A view per example and step drawn from the example's first ``K`` views.

    Returns the augmented batch and each example's slot in ``0..K-1``: the column of
    the cached teacher logits that belong to exactly that view.
    """

    def __init__(self, orders: torch.Tensor, seed: int, padding: int = PADDING) -> None:
        self.orders = orders  # [num_images, K] view ids, on the images' device
        self.generator = torch.Generator().manual_seed(seed)
        self.padding = padding

    @property
    def k(self) -> int:
        return self.orders.shape[1]

    def draw(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's view id and cache slot per example (on the orders' device)."""
        slots = torch.randint(0, self.k, (len(idx),), generator=self.generator).to(self.orders.device)
        return self.orders[idx.to(self.orders.device), slots], slots

    def __call__(self, idx: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views, slots = self.draw(idx)
        return apply_views(images, views, self.padding), slots.to(images.device)
