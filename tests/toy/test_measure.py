import torch

from sp_grpo.toy.measure import centroids, component_stats, glyph_iou
from sp_grpo.toy.world import glyph_masks


def _components(mask):
    """Sizes of 8-connected components by breadth-first search."""
    h, w = len(mask), len(mask[0])
    seen, sizes = set(), []
    for i in range(h):
        for j in range(w):
            if mask[i][j] and (i, j) not in seen:
                stack, size = [(i, j)], 0
                seen.add((i, j))
                while stack:
                    a, b = stack.pop()
                    size += 1
                    for da in (-1, 0, 1):
                        for db in (-1, 0, 1):
                            u, v = a + da, b + db
                            if 0 <= u < h and 0 <= v < w and mask[u][v] and (u, v) not in seen:
                                seen.add((u, v))
                                stack.append((u, v))
                sizes.append(size)
    return sizes


def test_component_stats_match_breadth_first_search():
    masks = torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.7
    area, largest = component_stats(masks)
    for b in range(3):
        for t in range(2):
            sizes = _components(masks[b, t].tolist())
            assert area[b, t] == sum(sizes)
            assert largest[b, t] == max(sizes, default=0)


def test_glyph_iou_matches_brute_force_placements():
    masks = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(1)) > 0.6
    glyphs = glyph_masks().bool()
    k = glyphs.shape[-1]
    got = glyph_iou(masks)
    for b in range(2):
        for s in range(len(glyphs)):
            best = 0.0
            for y in range(-k + 1, 10):
                for x in range(-k + 1, 10):
                    placed = torch.zeros(10 + 2 * k, 10 + 2 * k, dtype=torch.bool)
                    placed[y + k : y + 2 * k, x + k : x + 2 * k] = glyphs[s]
                    placed = placed[k : k + 10, k : k + 10]
                    inter = (placed & masks[b, 0]).sum().item()
                    union = masks[b, 0].sum().item() + glyphs[s].sum().item() - inter
                    best = max(best, inter / union)
            assert abs(got[b, 0, s].item() - best) < 1e-6


def test_centroids():
    masks = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    masks[0, 0, 2:4, 4:8] = True
    xy, present = centroids(masks)
    assert xy[0, 0].tolist() == [5.5, 2.5]
    assert present.tolist() == [[True, False]]
