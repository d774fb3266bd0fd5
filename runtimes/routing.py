"""Stage routing: what each stage reads, written once for the executor and the converters.

A stage reads either the decoded image resized to its own size (``"image"``: uint8 NHWC pixels
for a stage that normalises in its graph, the normalised float tensor for older bundles),
or the carry tensor an earlier stage produced (``"carry"``). :class:`StageRouter` builds stage
``k``'s input for any subset of a batch's rows from the decoded images and the :class:`Carries`
held so far; :func:`run_chain` runs one batch through every stage and :func:`stage_tensors`
many images in batches, with any runner (a runtime session, a torch or a Keras model), so every
caller routes the same way. Only numpy
is used here. A new source (image patches) is one more branch of :meth:`StageRouter.input`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Collection, Iterator, Mapping, Sequence

import numpy as np

from stagewise.errors import ManifestError
from stagewise.images import Preprocess
from stagewise.manifest import Manifest, StageInput

RunStage = Callable[[int, np.ndarray], Mapping[str, np.ndarray]]


class Carries:
    """The carry outputs of the stages run so far, one row per image of the batch (``n`` rows)."""

    def __init__(self, n: int):
        self.n = n
        self._held: dict[int, np.ndarray] = {}

    def store(self, stage: int, carry: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Keep ``carry`` of ``stage`` for ``rows`` of the batch (``None``: every row)."""
        if rows is None:
            self._held[stage] = carry
            return
        held = self._held.get(stage)
        if held is None:
            held = self._held[stage] = np.zeros((self.n,) + carry.shape[1:], dtype=carry.dtype)
        held[rows] = carry

    def take(self, stage: int, rows: np.ndarray | None = None) -> np.ndarray:
        """The carry of ``stage`` for ``rows`` (``None``: every row)."""
        held = self._held[stage]
        return held if rows is None else held[rows]


@dataclass(frozen=True)
class StageRouter:
    """Where every stage's input comes from.

    ``inputs[k]`` is stage ``k``'s :class:`~stagewise.manifest.StageInput`; ``carry_outputs[k]``
    the name of the carry output stage ``k`` hands on (``None``: it hands on nothing).
    """

    names: tuple[str, ...]
    inputs: tuple[StageInput, ...]
    preprocess: Preprocess
    carry_outputs: tuple[str | None, ...]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.inputs) == len(self.carry_outputs):
            raise ValueError("a router needs one name, input and carry output per stage")
        for k, source in enumerate(self.inputs):
            if source.source == "carry":
                earlier = self.names[:k]
                if source.from_stage not in earlier or self.carry_outputs[earlier.index(source.from_stage)] is None:
                    raise ManifestError(f"stage {self.names[k]!r} reads the carry of {source.from_stage!r}, which is "
                                        "not an earlier stage with a carry output")
            elif source.source != "image":
                raise ManifestError(f"stage {self.names[k]!r} has input source {source.source!r}; this stagewise "
                                    "routes 'image' and 'carry' inputs, upgrade it to run this bundle")

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "StageRouter":
        """The routing a bundle's stages describe."""
        return cls(tuple(manifest.stage_names), tuple(s.input for s in manifest.stages), manifest.input,
                   tuple(s.outputs.carry for s in manifest.stages))

    @classmethod
    def from_sources(cls, names: Sequence[str], sources: Sequence[Mapping], preprocess: Preprocess,
                     carry_output: str = "carry") -> "StageRouter":
        """From a converter's plans: ``sources[k]`` is ``{"source": "image", "size": [h, w]}`` or
        ``{"source": "carry", "from": name}``; a stage that a later one reads hands on ``carry_output``."""
        inputs = tuple(StageInput.from_dict(s) for s in sources)
        read = {s.from_stage for s in inputs if s.source == "carry"}
        return cls(tuple(names), inputs, preprocess, tuple(carry_output if n in read else None for n in names))

    def __len__(self) -> int:
        return len(self.inputs)

    def reads_image(self, k: int) -> bool:
        return self.inputs[k].source == "image"

    def image_sizes(self) -> list[tuple[int, int]]:
        """The (height, width) of every stage that reads the image, in stage order."""
        return [s.size for s in self.inputs if s.source == "image"]

    def carry_from(self, k: int) -> int | None:
        """The index of the stage whose carry stage ``k`` reads (``None`` when it reads the image)."""
        source = self.inputs[k]
        return self.names.index(source.from_stage) if source.source == "carry" else None

    def chain(self, k: int) -> list[int]:
        """The stages to run, in order, to get stage ``k``'s answer on its own: ``k`` and those feeding it."""
        chain = [k]
        while (before := self.carry_from(chain[-1])) is not None:
            chain.append(before)
        return chain[::-1]

    def needed(self) -> set[int]:
        """The stages whose carry some later stage reads."""
        return {j for k in range(len(self)) if (j := self.carry_from(k)) is not None}

    def input(self, k: int, images: Sequence[np.ndarray], carries: Carries,
              rows: np.ndarray | None = None) -> np.ndarray:
        """Stage ``k``'s input for ``rows`` of the batch (``None``: every row).

        ``images`` are the batch's decoded HxWx3 uint8 images; ``carries`` what earlier stages handed on.
        """
        source = self.inputs[k]
        if source.source == "image":
            chosen = list(images) if rows is None else [images[i] for i in rows]
            return self.preprocess.stage_input(chosen, source.size, source.pixels)
        return carries.take(self.carry_from(k), rows)

    def grey(self, k: int) -> np.ndarray:
        """Image stage ``k``'s input for a uniform grey image, built at the stage's size (no resize)."""
        size = self.inputs[k].size
        grey = [np.full((size[0], size[1], 3), 128, dtype=np.uint8)]
        return replace(self.preprocess, resize="stretch").stage_input(grey, size, self.inputs[k].pixels)

    def keep(self, k: int, outputs: Mapping[str, np.ndarray], carries: Carries, rows: np.ndarray | None = None) -> None:
        """Hold stage ``k``'s carry from its ``outputs`` for later stages (if it hands one on)."""
        name = self.carry_outputs[k]
        if name is not None:
            carries.store(k, outputs[name], rows)


@dataclass(frozen=True)
class StageTensors:
    """Every stage's inputs (N x ... per stage) and, when asked for, its outputs by name."""

    inputs: list[np.ndarray]
    outputs: list[dict[str, np.ndarray]] | None


def run_chain(router: StageRouter, images: Sequence[np.ndarray], run_stage: RunStage,
              run: Collection[int] | None = None) -> Iterator[tuple[int, np.ndarray, Mapping[str, np.ndarray] | None]]:
    """Route one batch of decoded ``images`` through every stage in order.

    Yields ``(k, input, outputs)`` per stage; ``run_stage(k, x) -> {output name: array}`` is
    called for the stages in ``run`` (default: all) and for those whose carry a later stage
    reads; ``outputs`` is ``None`` for a stage that was not run.
    """
    wanted = set(range(len(router)) if run is None else run) | router.needed()
    carries = Carries(len(images))
    for k in range(len(router)):
        x = router.input(k, images, carries)
        out = None
        if k in wanted:
            out = run_stage(k, x)
            router.keep(k, out, carries)
        yield k, x, out


def stage_tensors(router: StageRouter, images: Sequence[np.ndarray], run_stage: RunStage, batch: int = 64,
                  outputs: bool = False) -> StageTensors:
    """Every stage's inputs for ``images`` (and with ``outputs`` its outputs), in batches of ``batch``.

    Without ``outputs``, only the stages whose carry a later stage reads are run.
    """
    per_input: list[list[np.ndarray]] = [[] for _ in range(len(router))]
    per_output: list[dict[str, list[np.ndarray]]] = [{} for _ in range(len(router))]
    for i in range(0, len(images), batch):
        for k, x, out in run_chain(router, list(images[i:i + batch]), run_stage, None if outputs else ()):
            per_input[k].append(x)
            if outputs:
                for name, value in out.items():
                    per_output[k].setdefault(name, []).append(np.asarray(value))
    return StageTensors([np.concatenate(xs) for xs in per_input],
                        [{n: np.concatenate(v) for n, v in o.items()} for o in per_output] if outputs else None)
