"""Stage routing: what each stage reads, written once for the executor and the converters.

A stage reads the decoded image resized to its own size (``"image"``: uint8 NHWC pixels
for a stage that normalises in its graph, the normalised float tensor for older bundles),
the carry tensor an earlier stage produced (``"carry"``), or a patch of the original image
chosen from an earlier stage's class-activation map (``"patch"``, see :mod:`.patches`).
:class:`StageRouter` builds stage ``k``'s input for any subset of a batch's rows from the
decoded images and the :class:`Carries` held so far; :func:`run_chain` runs one batch through
every stage and :func:`stage_tensors` many images in batches, with any runner (a runtime
session, a torch or a Keras model), so every caller routes the same way. Only numpy is used here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Hashable, Iterator, Mapping, Sequence

import numpy as np

from stagewise.errors import ManifestError
from stagewise.images import Preprocess
from stagewise.manifest import CamGrid, Manifest, StageInput

from .patches import PatchChoice, cam_extent

RunStage = Callable[[int, np.ndarray], Mapping[str, np.ndarray]]


class Carries:
    """What the stages run so far handed on, one row per image of the batch (``n`` rows).

    Keyed by the stage index for carry tensors, and by ``("cam", k)`` / ``("box", k)`` for stage
    ``k``'s class-activation map and the patch box it read.
    """

    def __init__(self, n: int):
        self.n = n
        self._held: dict[Hashable, np.ndarray] = {}

    def store(self, key: Hashable, carry: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Keep ``carry`` under ``key`` for ``rows`` of the batch (``None``: every row)."""
        if rows is None:
            self._held[key] = carry
            return
        held = self._held.get(key)
        if held is None:
            held = self._held[key] = np.zeros((self.n,) + carry.shape[1:], dtype=carry.dtype)
        held[rows] = carry

    def take(self, key: Hashable, rows: np.ndarray | None = None) -> np.ndarray:
        """What is held under ``key`` for ``rows`` (``None``: every row)."""
        held = self._held[key]
        return held if rows is None else held[rows]

    def get(self, key: Hashable, rows: np.ndarray | None = None) -> np.ndarray | None:
        """Like :meth:`take`, ``None`` when nothing is held under ``key``."""
        return self.take(key, rows) if key in self._held else None


@dataclass(frozen=True)
class StageRouter:
    """Where every stage's input comes from.

    ``inputs[k]`` is stage ``k``'s :class:`~stagewise.manifest.StageInput`; ``carry_outputs[k]``
    the name of the carry output stage ``k`` hands on (``None``: it hands on nothing);
    ``cam_outputs[k]``/``cams[k]`` its class-activation map output and where its cells sit
    (``None`` when it has none). ``patches`` says how patch stages order the CAM cells.
    """

    names: tuple[str, ...]
    inputs: tuple[StageInput, ...]
    preprocess: Preprocess
    carry_outputs: tuple[str | None, ...]
    cam_outputs: tuple[str | None, ...] = ()
    cams: tuple[CamGrid | None, ...] = ()
    patches: PatchChoice = field(default_factory=PatchChoice)

    def __post_init__(self) -> None:
        if not self.cam_outputs:
            object.__setattr__(self, "cam_outputs", (None,) * len(self.names))
            object.__setattr__(self, "cams", (None,) * len(self.names))
        if not len(self.names) == len(self.inputs) == len(self.carry_outputs) == len(self.cam_outputs) == len(self.cams):
            raise ValueError("a router needs one name, input, carry output and CAM output per stage")
        feeders = []
        for k, source in enumerate(self.inputs):
            earlier = self.names[:k]
            feeder = earlier.index(source.from_stage) if source.from_stage in earlier else None
            feeders.append(feeder)
            if source.source == "carry":
                if feeder is None or self.carry_outputs[feeder] is None:
                    raise ManifestError(f"stage {self.names[k]!r} reads the carry of {source.from_stage!r}, which is "
                                        "not an earlier stage with a carry output")
            elif source.source == "patch":
                if feeder is None or self.cam_outputs[feeder] is None or self.cams[feeder] is None:
                    raise ManifestError(f"stage {self.names[k]!r} reads patches chosen from the CAM of "
                                        f"{source.from_stage!r}, which is not an earlier stage with a CAM output; "
                                        "convert that model as a glance stage (--focus) or let this stage read the image")
            elif source.source != "image":
                raise ManifestError(f"stage {self.names[k]!r} has input source {source.source!r}; this stagewise "
                                    "routes 'image', 'carry' and 'patch' inputs, upgrade it to run this bundle")
        object.__setattr__(self, "_feeders", tuple(feeders))  # looked up per stage and image: resolved once

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "StageRouter":
        """The routing a bundle's stages describe."""
        return cls(tuple(manifest.stage_names), tuple(s.input for s in manifest.stages), manifest.input,
                   tuple(s.outputs.carry for s in manifest.stages), tuple(s.outputs.cam for s in manifest.stages),
                   tuple(s.cam for s in manifest.stages))

    @classmethod
    def from_sources(cls, names: Sequence[str], sources: Sequence[Mapping], preprocess: Preprocess,
                     carry_output: str = "carry", cams: Sequence[Mapping | None] | None = None,
                     cam_output: str = "cam") -> "StageRouter":
        """From a converter's plans: ``sources[k]`` is ``{"source": "image", "size": [h, w]}``,
        ``{"source": "carry", "from": name}`` or a patch source; a stage that a later one reads hands
        on ``carry_output``; ``cams[k]`` is the CAM record of a stage that outputs ``cam_output``."""
        inputs = tuple(StageInput.from_dict(s) for s in sources)
        read = {s.from_stage for s in inputs if s.source == "carry"}
        grids = tuple(CamGrid.from_dict(c) if c else None for c in (cams or [None] * len(names)))
        return cls(tuple(names), inputs, preprocess, tuple(carry_output if n in read else None for n in names),
                   tuple(cam_output if g else None for g in grids), grids)

    def __len__(self) -> int:
        return len(self.inputs)

    def reads_image(self, k: int) -> bool:
        return self.inputs[k].source == "image"

    def with_patches(self, patches: PatchChoice) -> "StageRouter":
        """This routing with patch stages ordering the CAM cells by ``patches``."""
        return replace(self, patches=patches)

    def image_sizes(self) -> list[tuple[int, int]]:
        """The (height, width) of every stage that reads the image, in stage order."""
        return [s.size for s in self.inputs if s.source == "image"]

    def carry_from(self, k: int) -> int | None:
        """The index of the stage whose carry stage ``k`` reads (``None`` when it reads the image)."""
        return self._feeders[k] if self.inputs[k].source == "carry" else None

    def fed_by(self, k: int) -> int | None:
        """The index of the stage whose output (carry or CAM) stage ``k`` reads (``None``: only the image)."""
        return self._feeders[k] if self.inputs[k].source in ("carry", "patch") else None

    def chain(self, k: int) -> list[int]:
        """The stages to run, in order, to get stage ``k``'s answer on its own: ``k`` and those feeding it."""
        chain = [k]
        while (before := self.fed_by(chain[-1])) is not None:
            chain.append(before)
        return chain[::-1]

    def needed(self) -> set[int]:
        """The stages whose carry or CAM some later stage reads."""
        return {j for k in range(len(self)) if (j := self.fed_by(k)) is not None}

    def input(self, k: int, images: Sequence[np.ndarray], carries: Carries,
              rows: np.ndarray | None = None) -> np.ndarray:
        """Stage ``k``'s input for ``rows`` of the batch (``None``: every row).

        ``images`` are the batch's decoded HxWx3 uint8 images; ``carries`` what earlier stages handed on.
        """
        source = self.inputs[k]
        if source.source == "carry":
            return carries.take(self._feeders[k], rows)
        chosen = list(images) if rows is None else [images[i] for i in rows]
        if source.source == "image":
            return self.preprocess.stage_input(chosen, source.size, source.pixels)
        boxes = self._patch_boxes(k, chosen, carries, rows)
        carries.store(("box", k), boxes, rows)
        return self.preprocess.patches(chosen, boxes, source.size, source.pixels)

    def _patch_boxes(self, k: int, images: Sequence[np.ndarray], carries: Carries,
                     rows: np.ndarray | None) -> np.ndarray:
        """The box patch stage ``k`` reads in each of ``images`` (len(images) x 4)."""
        source = self.inputs[k]
        glance = self.fed_by(k)
        size = self.inputs[glance].size
        cams = carries.take(("cam", glance), rows)
        return np.stack([
            self.patches.boxes(cam, image, self.cams[glance], size,
                               self.preprocess.crop_box(image.shape[0], image.shape[1], size),
                               source.patch_fraction, source.count, source.iou)[source.index]
            for cam, image in zip(cams, images)])

    def cam_extent(self, k: int, image: np.ndarray) -> tuple[float, float, float, float]:
        """The region of ``image`` (original pixels) that the CAM cells of stage ``k`` cover."""
        size = self.inputs[k].size
        return cam_extent(self.cams[k], size, self.preprocess.crop_box(image.shape[0], image.shape[1], size))

    def box(self, k: int, carries: Carries, rows: np.ndarray | None = None) -> np.ndarray | None:
        """The patch boxes stage ``k`` read for ``rows`` (``None`` when it does not read patches)."""
        return carries.get(("box", k), rows) if self.inputs[k].source == "patch" else None

    def warm_input(self, k: int, carries: Carries) -> np.ndarray:
        """Stage ``k``'s input for warming up: a grey image (or patch) at its size, or the carry held."""
        return self.grey(k) if self.inputs[k].reads_pixels else carries.take(self.carry_from(k))

    def grey(self, k: int) -> np.ndarray:
        """Image or patch stage ``k``'s input for a uniform grey image, built at the stage's size (no resize)."""
        size = self.inputs[k].size
        grey = [np.full((size[0], size[1], 3), 128, dtype=np.uint8)]
        return replace(self.preprocess, resize="stretch").stage_input(grey, size, self.inputs[k].pixels)

    def keep(self, k: int, outputs: Mapping[str, np.ndarray], carries: Carries, rows: np.ndarray | None = None) -> None:
        """Hold stage ``k``'s carry from its ``outputs`` for later stages (if it hands one on)."""
        name = self.carry_outputs[k]
        if name is not None:
            carries.store(k, outputs[name], rows)
        cam = self.cam_outputs[k]
        if cam is not None:
            carries.store(("cam", k), outputs[cam], rows)


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
