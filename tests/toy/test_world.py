import itertools

import pytest
import torch

from sp_grpo.toy.world import (
    CELL,
    COLOURS,
    DIRECTIONS,
    NUM_FRAMES,
    SHAPES,
    SIZE,
    parse_prompt,
    prompts_for_split,
    random_layouts,
    render,
    render_batch,
    start_cells,
)


def test_render_is_deterministic_in_the_seed():
    for seed in range(4):
        assert torch.equal(render("a red ring moving left", seed), render("a red ring moving left", seed))
    layouts = {render("a red ring moving left", seed).sum(dim=1).nonzero()[0].tolist().__str__() for seed in range(20)}
    assert len(layouts) == len(start_cells("left"))


def _reference_video(colour, shape, direction, x, y):
    """Draw the glyph pixel by pixel with loops."""
    glyph = SHAPES[shape]
    rgb = COLOURS[colour]
    dx, dy = DIRECTIONS[direction]
    video = torch.zeros(NUM_FRAMES, 3, SIZE, SIZE)
    for t in range(NUM_FRAMES):
        for row, line in enumerate(glyph):
            for col, char in enumerate(line):
                if char != "#":
                    continue
                for py in range(CELL):
                    for px in range(CELL):
                        yy = ((y + t * dy) + row) * CELL + py
                        xx = ((x + t * dx) + col) * CELL + px
                        video[t, :, yy, xx] = torch.tensor(rgb)
    return video


def test_render_batch_matches_pixel_loops():
    cases = [(c, s, d, *start) for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS) for start in start_cells(d)][::7]
    index = lambda table, key: list(table).index(key)  # noqa: E731
    got = render_batch(
        torch.tensor([index(COLOURS, c[0]) for c in cases]),
        torch.tensor([index(SHAPES, c[1]) for c in cases]),
        torch.tensor([index(DIRECTIONS, c[2]) for c in cases]),
        torch.tensor([c[3] for c in cases]),
        torch.tensor([c[4] for c in cases]),
    )
    for video, case in zip(got, cases):
        assert torch.equal(video, _reference_video(*case))


def test_starts_keep_the_glyph_inside():
    for direction in DIRECTIONS:
        for x, y in start_cells(direction):
            video = _reference_video("red", "square", direction, x, y)  # would raise IndexError outside
            assert (video.amax(dim=(1, 2, 3)) > 0).all()


def test_random_layouts_draw_allowed_starts():
    direction = torch.arange(4).repeat(50)
    x, y = random_layouts(direction, torch.Generator().manual_seed(0))
    for d, xi, yi in zip(direction.tolist(), x.tolist(), y.tolist()):
        assert (xi, yi) in start_cells(list(DIRECTIONS)[d])


def test_splits_hold_out_combinations_but_keep_every_pair():
    train, val, test = (set(prompts_for_split(s)) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (32, 16, 16)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(prompts_for_split("all"))
    attrs = [parse_prompt(p) for p in train]
    for a, b in [("colour", "shape"), ("colour", "direction"), ("shape", "direction")]:
        seen = {(getattr(p, a), getattr(p, b)) for p in attrs}
        names = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS}
        assert seen == set(itertools.product(names[a], names[b]))


def test_parse_prompt_round_trips_and_rejects_other_prompts():
    for prompt in prompts_for_split("all"):
        assert parse_prompt(prompt).text == prompt
    with pytest.raises(ValueError, match="not in the shapes world's grammar"):
        parse_prompt("a purple square moving left")
    with pytest.raises(ValueError, match=r"`split` \('dev'\) must be one of"):
        prompts_for_split("dev")
