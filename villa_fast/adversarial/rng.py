"""Random streams for a pass and its recomputation that a CUDA graph can replay.

``clean_backward="recompute"`` runs the clean forward once without keeping its activations and again
inside the final backward; the second run must draw the same dropout masks as the first. Eagerly,
``torch.utils.checkpoint`` does that by saving the generator's state and setting it back, but setting a
CUDA generator's state cannot be captured: a replayed graph would recompute with other masks.

:class:`ForkedRng` instead gives the pass its own random stream, in two equal copies, ``first`` for the
forward and ``again`` for the recomputation. The stream is seeded apart from the default generator's (by a
seed derived from that generator's state), so the clean pass's dropout masks are not those the perturbed
passes draw next from the default generator: the released loop's step 0 draws a different mask from the
clean pass's (VILLA_SPEC section 2). Each run swaps its copy in for the default generator and swaps the
original back afterwards, so every kernel that draws from the default generator (dropout, attention
dropout inside fused kernels) draws from that copy. Both copies advance by the same amount at every step,
so they stay equal at the start of the next one. On
CUDA the swap is ``graphsafe_set_state`` and both copies are registered with the graph
(:meth:`ForkedRng.register`), which advances them at every replay as it advances the default generator:
the same mechanism torch's compiler uses for recomputed random operations under CUDA graphs.

CPU generators cannot swap states in place; there the same scheme runs on saved states (``get_state``
and ``set_state``), with the same draws, so the logic is the same on both devices.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch

_PARTS = ("first", "again")


def graphsafe_rng_available() -> bool:
    """Whether this torch can swap CUDA generator states inside a graph capture and register them."""
    return all(hasattr(torch.Generator, m) for m in ("graphsafe_get_state", "graphsafe_set_state", "clone_state")) and (
        hasattr(torch.cuda, "CUDAGraph") and hasattr(torch.cuda.CUDAGraph, "register_generator_state")
    )


def derived_seed(state: torch.Tensor) -> int:
    """A 63-bit seed determined by a generator state (its bytes hashed): reproducible from the default
    generator's seed and position, and unrelated to the stream that state itself goes on to draw."""
    digest = hashlib.blake2b(state.cpu().numpy().tobytes(), digest_size=8, person=b"villa_fast.rng").digest()
    return int.from_bytes(digest, "little") >> 1


class ForkedRng:
    """Two equal copies (``first``, ``again``) of a random stream of its own for ``device``.

    The stream is seeded by ``seed``, by default :func:`derived_seed` of the default generator's state at
    construction (the default generator is not advanced). ``use("first")`` / ``use("again")`` are context
    managers under which the default generator of ``device`` draws from that copy; the default generator
    itself is left where it was. ``resync()`` makes ``again`` equal to ``first`` (outside a capture), e.g.
    after a forward that was not recomputed.
    """

    def __init__(self, device: torch.device | str, seed: int | None = None) -> None:
        device = torch.device(device)
        if device.type == "cuda":
            if not graphsafe_rng_available():
                raise RuntimeError("ForkedRng on CUDA needs torch.Generator.graphsafe_set_state (torch >= 2.5)")
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._gen = torch.cuda.default_generators[index]
            self._graphsafe = True
        elif device.type == "cpu":
            self._gen = torch.default_generator
            self._graphsafe = False
        else:
            raise ValueError(f"ForkedRng supports cpu and cuda devices, not {device.type!r}")
        self.seed = derived_seed(self._gen.get_state()) if seed is None else int(seed)
        own = torch.Generator(device=device)
        own.manual_seed(self.seed)
        if self._graphsafe:
            self._states: dict[str, object] = {p: own.clone_state() for p in _PARTS}
        else:
            state = own.get_state()
            self._states = {p: state.clone() for p in _PARTS}
        self.device = device

    def snapshot(self) -> ForkedRng:
        """A new ForkedRng whose two copies both stand where ``first`` stands now (outside a capture): the
        stream the next clean pass of this one will draw."""
        twin = object.__new__(ForkedRng)
        twin._gen, twin._graphsafe, twin.seed, twin.device = self._gen, self._graphsafe, self.seed, self.device
        first = self._states["first"]
        if self._graphsafe:
            twin._states = {p: first.clone_state() for p in _PARTS}
        else:
            twin._states = {p: first.clone() for p in _PARTS}
        return twin

    @contextlib.contextmanager
    def use(self, part: str) -> Iterator[None]:
        """Draw from copy ``part`` of the default generator inside the block."""
        if part not in self._states:
            raise ValueError(f"part must be one of {_PARTS}, got {part!r}")
        gen = self._gen
        if self._graphsafe:
            saved = gen.graphsafe_get_state()
            gen.graphsafe_set_state(self._states[part])
            try:
                yield
            finally:
                gen.graphsafe_set_state(saved)
        else:
            saved = gen.get_state()
            gen.set_state(self._states[part])
            try:
                yield
            finally:
                self._states[part] = gen.get_state()
                gen.set_state(saved)

    def contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``(use("first"), use("again"))``: the ``context_fn`` result ``torch.utils.checkpoint`` takes."""
        return self.use("first"), self.use("again")

    def resync(self) -> None:
        """Make ``again`` equal to ``first`` (never inside a graph capture: a replay would not redo it)."""
        if self._graphsafe:
            self._states["again"] = self._states["first"].clone_state()
        else:
            self._states["again"] = self._states["first"].clone()

    def register(self, graph: torch.cuda.CUDAGraph) -> None:
        """Register both copies with ``graph`` before capturing, so each replay advances them."""
        if not self._graphsafe:
            raise RuntimeError("only CUDA generator states can be registered with a CUDA graph")
        for part in _PARTS:
            graph.register_generator_state(self._states[part])
