"""Position ids: 1D for text, (t, h, w) for the VL/omni models' 3D RoPE (docs/architecture.md §2.1).

Text tokens get (p, p, p). A vision item placed at counter ``cur`` gets ``(cur + frame pair, cur + row,
cur + column)`` for each merged token; the next token continues at max(coordinates) + 1, and decoding
continues from the row's maximum + 1 (kept as a per-row delta).
"""

from __future__ import annotations

import torch


def text_positions(padding_mask: torch.Tensor | None, past: int, seq: int, device) -> torch.Tensor:
    """[B, S] positions counting real tokens only, so a left-padded row matches the same row unpadded."""
    if padding_mask is None:
        return (torch.arange(seq, device=device) + past)[None]
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]


def vision_item_positions(grid_thw: list[int], cur: int, merge: int, t_merge: int) -> torch.Tensor:
    """[3, n] (t, h, w) positions of one image (t_merge 1) or video's merged tokens, starting at cur."""
    t, h, w = grid_thw
    gt, gh, gw = max(t // t_merge, 1), h // merge, w // merge
    tt, hh, ww = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + cur


class _Items:
    """The media items of one placeholder kind, consumed run by run (a video may span several runs when its
    frames are interleaved with its sound track)."""

    def __init__(self, token: int, grids: list[list[int]], t_merge: int, merge: int) -> None:
        self.token, self.grids, self.t_merge, self.merge = token, iter(grids), t_merge, merge
        self.grid: list[int] | None = None
        self.done = 0  # frame pairs of the current item already placed

    def take(self, run: int, cur: int, at: int) -> torch.Tensor:
        if self.grid is None:
            self.grid = next(self.grids, None)
            self.done = 0
            if self.grid is None:
                raise ValueError(f"more placeholder runs of token {self.token} than media items (grid_thw rows)")
        t, h, w = self.grid
        pairs = max(t // self.t_merge, 1)
        per_pair = (h // self.merge) * (w // self.merge)
        if run % per_pair or self.done + run // per_pair > pairs:
            raise ValueError(f"{run} placeholders {self.token} at {at} do not fit the item of grid {self.grid}")
        k = run // per_pair
        pos = vision_item_positions([k * self.t_merge if t > 1 else 1, h, w], cur, self.merge, self.t_merge)
        self.done += k
        if self.done == pairs:
            self.grid = None
        return pos


def rope_index(
    input_ids: torch.Tensor,
    spans: dict[int, tuple[list[list[int]], int]],
    merge: int,
    padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D position ids [3, B, S] and per-row decode deltas [B] (next position = real length + delta).

    spans: placeholder token id -> (grid_thw of its items in order, temporal merge) for images and videos.
    Every other token (text, and audio placeholders) advances along time by one step, as text does.
    """
    b, s = input_ids.shape
    out = torch.zeros(3, b, s, dtype=torch.long)
    deltas = torch.zeros(b, dtype=torch.long)
    items = {tok: _Items(tok, g, tm, merge) for tok, (g, tm) in spans.items()}
    ids_all = input_ids.cpu()
    for row in range(b):
        keep = padding_mask[row].bool().cpu() if padding_mask is not None else torch.ones(s, dtype=torch.bool)
        ids = ids_all[row][keep].tolist()
        pieces, cur, i = [], 0, 0
        while i < len(ids):
            tok = ids[i]
            j = i + 1
            if tok in items:
                while j < len(ids) and ids[j] == tok:
                    j += 1
                pos = items[tok].take(j - i, cur, i)
                cur = int(pos.max()) + 1
            else:  # text (and audio): one step per token
                while j < len(ids) and ids[j] not in items:
                    j += 1
                pos = torch.arange(cur, cur + j - i).expand(3, -1)
                cur += j - i
            pieces.append(pos)
            i = j
        pos = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        out[:, row, keep] = pos
        deltas[row] = cur - len(ids)
    return out.to(input_ids.device), deltas.to(input_ids.device)
