"""Scenes-Video clips: one object that moves, appears, disappears or changes colour.

A clip is ``n_frames`` square frames. No single frame tells the event: every frame of a
motion is a still object somewhere on the path (both directions pass there), a frame of
an appearing object is also a frame of a disappearing one, and a recolouring object shows
one of its two colours in any one frame. OOD clips (pool ``"striped"``) draw a striped
background and a static distractor object, neither seen in training.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fam.config.scenes import COLOURS, SHAPES
from fam.data.scenes.render import _shape_mask

__all__ = ["EVENTS", "REVERSED", "Clip", "sample_clip", "render_clip", "caption", "question"]

#: The events, the video-classification labels.
EVENTS: tuple[str, ...] = ("moves right", "moves left", "moves down", "moves up", "appears",
                           "disappears", "changes colour")
#: The event a clip shows when played backwards (hard negatives: order decides).
REVERSED = {"moves right": "moves left", "moves left": "moves right", "moves down": "moves up",
            "moves up": "moves down", "appears": "disappears", "disappears": "appears",
            "changes colour": "changes colour"}
_STEP = {"moves right": (1, 0), "moves left": (-1, 0), "moves down": (0, 1), "moves up": (0, -1)}


@dataclass(frozen=True)
class Clip:
    """One clip: the object, its event, the second colour of a recolouring, where it is."""

    id: str
    shape: str
    colour: str
    event: str
    colour2: str
    pos: tuple[int, int]  # fixed position, or the fixed coordinate of a motion
    style: str = "plain"  # "plain" or "striped" (OOD)
    distractor: tuple[str, str] | None = None  # (shape, colour), static, OOD only


def sample_clip(rng: np.random.Generator, cid: str, size: int, event: str | None = None,
                style: str = "plain", shape: str | None = None, colour: str | None = None
                ) -> Clip:
    """A random clip (``event``/``shape``/``colour`` fixed when given)."""
    colours = sorted(COLOURS)
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    colour = colour or colours[int(rng.integers(len(colours)))]
    event = event or EVENTS[int(rng.integers(len(EVENTS)))]
    colour2 = [c for c in colours if c != colour][int(rng.integers(len(colours) - 1))]
    s = size // 4
    pos = (int(rng.integers(2, size - s - 2)), int(rng.integers(2, size - s - 2)))
    distractor = None
    if style == "striped":
        distractor = ([x for x in SHAPES if x != shape][int(rng.integers(len(SHAPES) - 1))],
                      [c for c in colours if c not in (colour, colour2)][
                          int(rng.integers(len(colours) - 2))])
    return Clip(cid, shape, colour, event, colour2, pos, style, distractor)


def render_clip(clip: Clip, n_frames: int, size: int) -> list[np.ndarray]:
    """The clip's frames, ``(size, size, 3)`` uint8 each, in time order."""
    s = size // 4
    mask = _shape_mask(clip.shape, s)
    yy, xx = np.mgrid[0:size, 0:size]
    if clip.style == "striped":
        grey = np.where(((xx + yy) // 4) % 2 == 0, 150, 106).astype(np.uint8)
    else:
        grey = np.full((size, size), 128, np.uint8)
    base = np.repeat(grey[:, :, None], 3, axis=2)
    if clip.distractor is not None:
        d = _shape_mask(clip.distractor[0], s // 2 + 2)
        base[1:1 + d.shape[0], 1:1 + d.shape[1]][d] = COLOURS[clip.distractor[1]]
    frames = []
    half = n_frames // 2
    lo, hi = 2, size - s - 2
    for i in range(n_frames):
        img = base.copy()
        x, y = clip.pos
        colour = clip.colour
        visible = True
        if clip.event in _STEP:
            dx, dy = _STEP[clip.event]
            k = i if (dx + dy) > 0 else n_frames - 1 - i  # played backwards: the reverse
            along = lo + (k * (hi - lo)) // (n_frames - 1)
            x, y = (along, y) if dx else (x, along)
        elif clip.event == "appears":
            visible = i >= half
        elif clip.event == "disappears":
            visible = i < half
        elif i >= half:
            colour = clip.colour2
        if visible:
            img[y:y + s, x:x + s][mask] = COLOURS[colour]
        frames.append(img)
    return frames


def caption(clip: Clip) -> str:
    """What happens, in words (the retrieval query)."""
    if clip.event == "changes colour":
        return f"a {clip.shape} changes from {clip.colour} to {clip.colour2}"
    return f"a {clip.colour} {clip.shape} {clip.event}"


def question(clip: Clip) -> tuple[str, list[str]]:
    """A question whose answer needs the order of frames, and its options (answer first)."""
    if clip.event in _STEP:
        ways = ["right", "left", "down", "up"]
        answer = clip.event.split()[1]
        return (f"Which way does the {clip.colour} {clip.shape} move?",
                [answer] + [w for w in ways if w != answer])
    if clip.event in ("appears", "disappears"):
        return (f"Is the {clip.colour} {clip.shape} visible at the end?",
                ["yes", "no"] if clip.event == "appears" else ["no", "yes"])
    others = [c for c in sorted(COLOURS) if c not in (clip.colour, clip.colour2)][:2]
    return (f"What colour is the {clip.shape} at the end?", [clip.colour2, clip.colour, *others])
