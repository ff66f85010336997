"""The shapes world: a prompt grammar, its prompt splits and a deterministic renderer.

A prompt names a colour, a shape and a direction of motion, e.g. ``"a red ring moving left"``.
Its video is ``NUM_FRAMES`` frames of ``SIZE x SIZE`` pixels: one solid object on a black
background that moves one cell per frame. Everything is snapped to a grid of ``CELL x CELL``
pixels, the patch size of the tiny generator, so that each transformer token is either object or
background and every move is exactly one token: a world a tiny model can learn
(:mod:`sp_grpo.toy.model`).

Shapes are 3 x 3 cell glyphs that differ in whole cells, not in corner pixels:

.. code-block:: text

    square  ring   plus   x
    ###     ###    .#.    #.#
    ###     #.#    ###    .#.
    ###     ###    .#.    #.#

Splits: the 64 combinations are divided by ``(colour + shape + direction) mod 4`` into
``test`` (residue 0), ``val`` (residue 1) and ``train`` (residues 2 and 3). Each residue class is a
Latin square, so every pair of attributes (colour-shape, colour-direction, shape-direction) occurs
in two training combinations, while no validation or test combination is ever seen in pre-training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

#: Colour name -> RGB in [0, 1]. Far apart in RGB, so a colour is read without ambiguity.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
#: Shape name -> 3 x 3 glyph of cells (row-major, ``#`` filled).
SHAPES: dict[str, tuple[str, str, str]] = {
    "square": ("###", "###", "###"),
    "ring": ("###", "#.#", "###"),
    "plus": (".#.", "###", ".#."),
    "x": ("#.#", ".#.", "#.#"),
}
#: Direction name -> (dx, dy) in cells per frame; y grows downwards, as in images.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}

SIZE = 16  #: Frame height and width in pixels.
CELL = 2  #: Grid cell in pixels (the generator's patch size).
GLYPH = 3  #: Glyph side in cells.
NUM_FRAMES = 4  #: Frames per video.
GRID = SIZE // CELL  #: Cells per side.
#: Cell offsets across the motion (the object's other coordinate): two, around the centre. Little
#: jitter is deliberate: a tiny transformer learns a near-deterministic layout far faster than it
#: learns to coordinate tokens around a random position.
CROSS_OFFSETS = (2, 3)

Split = Literal["train", "val", "test", "all"]
_SPLIT_RESIDUES: dict[str, tuple[int, ...]] = {"test": (0,), "val": (1,), "train": (2, 3), "all": (0, 1, 2, 3)}
VOCABULARY: tuple[str, ...] = ("a", "moving", *COLOURS, *SHAPES, *DIRECTIONS)


@dataclass(frozen=True)
class ShapePrompt:
    """The three attributes a prompt names."""

    colour: str
    shape: str
    direction: str

    @property
    def text(self) -> str:
        """The prompt sentence, e.g. ``"a red ring moving left"``."""
        return f"a {self.colour} {self.shape} moving {self.direction}"

    @property
    def index(self) -> tuple[int, int, int]:
        """Indices of (colour, shape, direction) in :data:`COLOURS`, :data:`SHAPES`, :data:`DIRECTIONS`."""
        return (list(COLOURS).index(self.colour), list(SHAPES).index(self.shape), list(DIRECTIONS).index(self.direction))


def parse_prompt(prompt: str) -> ShapePrompt:
    """Read the attributes off a prompt of the grammar ``a <colour> <shape> moving <direction>``.

    Args:
        prompt: The prompt; case and extra spaces are ignored.

    Returns:
        The attributes.

    Raises:
        ValueError: If the prompt does not follow the grammar.
    """
    words = prompt.lower().split()
    if len(words) != 5 or words[0] != "a" or words[3] != "moving" or words[1] not in COLOURS or words[2] not in SHAPES or words[4] not in DIRECTIONS:
        raise ValueError(
            f"Prompt {prompt!r} is not in the shapes world's grammar 'a <colour> <shape> moving <direction>' with"
            f" colour in {list(COLOURS)}, shape in {list(SHAPES)}, direction in {list(DIRECTIONS)}."
        )
    return ShapePrompt(words[1], words[2], words[4])


def prompts_for_split(split: Split = "all") -> list[str]:
    """The prompts of a split, in a fixed order (colour, then shape, then direction).

    Args:
        split: ``"train"`` (32 prompts), ``"val"`` (16), ``"test"`` (16, the held-out split) or ``"all"`` (64).

    Returns:
        The prompt sentences.

    Raises:
        ValueError: If ``split`` is unknown.
    """
    if split not in _SPLIT_RESIDUES:
        raise ValueError(f"`split` ({split!r}) must be one of {list(_SPLIT_RESIDUES)}.")
    residues = _SPLIT_RESIDUES[split]
    out = []
    for c, colour in enumerate(COLOURS):
        for s, shape in enumerate(SHAPES):
            for d, direction in enumerate(DIRECTIONS):
                if (c + s + d) % 4 in residues:
                    out.append(ShapePrompt(colour, shape, direction).text)
    return out


def glyph_masks() -> Tensor:
    """The shapes' glyphs at pixel resolution.

    Returns:
        ``(num_shapes, GLYPH * CELL, GLYPH * CELL)`` float tensor of 0/1, in :data:`SHAPES` order.
    """
    cells = torch.tensor([[[c == "#" for c in row] for row in rows] for rows in SHAPES.values()], dtype=torch.float32)
    return cells.repeat_interleave(CELL, dim=1).repeat_interleave(CELL, dim=2)


def start_cells(direction: str) -> list[tuple[int, int]]:
    """The top-left start cells ``(x, y)`` of a direction: the glyph stays inside the frame while it moves.

    Args:
        direction: A key of :data:`DIRECTIONS`.

    Returns:
        The allowed starts, in cells.
    """
    dx, dy = DIRECTIONS[direction]
    travel = NUM_FRAMES - 1
    last = GRID - GLYPH  # largest top-left cell that keeps the glyph inside
    # Along the motion the start is fixed: the middle of the range that keeps the glyph inside.
    low = travel if (dx < 0 or dy < 0) else 0
    along = [low + (last - travel) // 2]
    if dx != 0:
        return [(x, y) for x in along for y in CROSS_OFFSETS]
    return [(x, y) for y in along for x in CROSS_OFFSETS]


def render_batch(colour: Tensor, shape: Tensor, direction: Tensor, start_x: Tensor, start_y: Tensor) -> Tensor:
    """Render videos from attribute indices and start cells, all at once.

    Frame ``t`` shows the glyph with its top-left cell at ``(start + t * velocity)``.

    Args:
        colour: ``(B,)`` indices into :data:`COLOURS`.
        shape: ``(B,)`` indices into :data:`SHAPES`.
        direction: ``(B,)`` indices into :data:`DIRECTIONS`.
        start_x: ``(B,)`` start column, in cells.
        start_y: ``(B,)`` start row, in cells.

    Returns:
        ``(B, NUM_FRAMES, 3, SIZE, SIZE)`` videos in ``{0, colour}``, on ``colour``'s device.
    """
    device = colour.device
    glyphs = glyph_masks().to(device)
    palette = torch.tensor(list(COLOURS.values()), device=device)
    velocity = torch.tensor(list(DIRECTIONS.values()), device=device)[direction]  # (B, 2) cells/frame
    t = torch.arange(NUM_FRAMES, device=device)
    x = (start_x[:, None] + t * velocity[:, None, 0]) * CELL  # (B, T) top-left pixel column
    y = (start_y[:, None] + t * velocity[:, None, 1]) * CELL
    pixels = torch.arange(SIZE, device=device)
    rel_x = pixels - x[..., None]  # (B, T, W)
    rel_y = pixels - y[..., None]  # (B, T, H)
    side = GLYPH * CELL
    inside = ((rel_y >= 0) & (rel_y < side))[..., :, None] & ((rel_x >= 0) & (rel_x < side))[..., None, :]
    b = torch.arange(len(shape), device=device)[:, None, None, None]
    mask = glyphs[shape][b, rel_y.clamp(0, side - 1)[..., :, None], rel_x.clamp(0, side - 1)[..., None, :]] * inside
    return mask[:, :, None] * palette[colour][:, None, :, None, None]


def render(prompt: str | ShapePrompt, seed: int = 0) -> Tensor:
    """Render the video of a prompt; the start cell is drawn from ``seed``.

    Args:
        prompt: A prompt of the grammar, or its attributes.
        seed: Chooses the start among :func:`start_cells`; the same seed gives the same video.

    Returns:
        ``(NUM_FRAMES, 3, SIZE, SIZE)`` video in ``[0, 1]``.

    Example:
        >>> render("a red ring moving left", seed=1).shape
        torch.Size([4, 3, 16, 16])
    """
    attrs = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    x, y = random.Random(seed).choice(start_cells(attrs.direction))
    indices = [torch.tensor([v]) for v in (*attrs.index, x, y)]
    return render_batch(*indices)[0]


def random_layouts(direction: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw a start cell for each direction index, uniformly among :func:`start_cells`.

    Args:
        direction: ``(B,)`` direction indices (CPU).
        generator: CPU generator.

    Returns:
        ``start_x`` and ``start_y``, each ``(B,)`` long tensors on the CPU.
    """
    tables = [torch.tensor(start_cells(name)) for name in DIRECTIONS]  # each (n, 2); all n equal
    choice = torch.randint(0, len(tables[0]), (len(direction),), generator=generator)
    starts = torch.stack(tables)[direction.cpu(), choice]
    return starts[:, 0], starts[:, 1]


__all__ = [
    "CELL",
    "COLOURS",
    "CROSS_OFFSETS",
    "DIRECTIONS",
    "GLYPH",
    "GRID",
    "NUM_FRAMES",
    "SHAPES",
    "SIZE",
    "VOCABULARY",
    "ShapePrompt",
    "Split",
    "glyph_masks",
    "parse_prompt",
    "prompts_for_split",
    "random_layouts",
    "render",
    "render_batch",
    "start_cells",
]
