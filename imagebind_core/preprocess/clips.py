"""Clip timestamps of the reference's sampler, shared by audio (3 x 2 s) and video (5 x 2 s).

The reference uses pytorchvideo's `ConstantClipsPerVideoSampler`: with m = max(duration - d, 0)
computed in floats, clip k of n starts at k * m / n as an exact fraction (note the divisor n,
not n - 1: the last clip does not reach the end) and ends d seconds later. Always n clips.
"""

from __future__ import annotations

from fractions import Fraction


def clip_spans(
    duration: float, clip_duration: float = 2, num_clips: int = 3
) -> list[tuple[Fraction, Fraction]]:
    """[(start, end)] in seconds, as exact fractions, for `num_clips` clips of `clip_duration`.

    `duration` is a float (samples / rate, or frames / fps) exactly as the reference computes it;
    the subtraction happens in floats before the exact fraction is taken, as in the reference.
    """
    d = Fraction(clip_duration)
    max_start = Fraction(max(duration - float(d), 0))
    step = max_start / num_clips
    return [(step * k, step * k + d) for k in range(num_clips)]
