"""Video frames for the models: T frames sampled over the clip, resized and centre-cropped to S×S RGB.

Frames are sampled at a target rate from the start of the clip (`fps`); a clip longer than
T / fps seconds is instead sampled at T evenly spaced times over its whole length, and a
shorter one leaves the tail of the T slots empty (zeros, mask False). Each sampled slot takes
the frame on screen at its time. Only the sampled frames are converted and resized (by
FFmpeg's scaler), so the cost is dominated by decoding itself.

Frames come out as they are displayed, not as they are stored: a phone's portrait clip is
usually stored landscape with a rotation in its display matrix, and is turned upright here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter


def first_video_stream(container: av.container.InputContainer) -> av.VideoStream | None:
    """The first real video stream (cover-art pictures attached to audio files are skipped)."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def stream_duration(stream: av.stream.Stream, container: av.container.InputContainer) -> float | None:
    """Seconds covered by a stream: its own duration when the file states it, else the container's."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def sample_times(duration: float | None, frames: int, fps: float) -> np.ndarray:
    """Times (s from the clip's first frame) of the sampled slots: at `fps`, or evenly over a long clip.

    Returns at most `frames` times; fewer when the clip is shorter than frames / fps (the
    remaining slots are padding). Unknown durations sample at `fps` from the start.
    """
    if duration is None or duration <= 0:
        return np.arange(frames) / fps
    at_rate = int(np.floor(duration * fps + 1e-6))
    if at_rate >= frames:
        return np.arange(frames) * (duration / frames)
    return np.arange(max(1, at_rate)) / fps


def quarter_turns(rotation: float) -> int:
    """np.rot90's k that shows a frame as displayed, from its display-matrix rotation in degrees.

    The rotation (`VideoFrame.rotation`) is counter-clockwise, as is np.rot90 on an (H, W, C)
    image: a 90 tag gives k=1, the -90 (or 270) of a phone held upright gives k=3, and ±180 gives 2.
    This is how ffmpeg and ffplay show such clips (checked against `ffmpeg -autorotate` output).
    Angles that are not quarter turns (and the flips a matrix can also hold) are rare enough to
    round to the nearest quarter turn rather than resample.
    """
    return round(rotation / 90) % 4


def resize_crop(frame: av.VideoFrame, size: int, reformatter: VideoReformatter | None = None) -> np.ndarray:
    """The frame as displayed, RGB uint8 (size, size, 3): shorter side scaled to `size`, centre cropped.

    "As displayed" applies the stream's rotation (see `quarter_turns`), so the shorter side and
    the crop are those of the upright picture. Pass one `reformatter` for all frames of a stream:
    it keeps FFmpeg's scaler between calls, which would otherwise be rebuilt for every frame
    (milliseconds each).
    """
    turns = quarter_turns(frame.rotation)
    # A quarter turn swaps the displayed sides.
    shown_width, shown_height = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
    scale = size / min(shown_width, shown_height)
    width, height = max(size, round(shown_width * scale)), max(size, round(shown_height * scale))
    # Scale the stored picture to the target turned back, then turn the small result: the same
    # pixels as turning first, without rotating the full-size frame.
    coded_width, coded_height = (height, width) if turns % 2 else (width, height)
    reformatter = reformatter or VideoReformatter()
    # swscale's bilinear widens its filter when shrinking, so it averages like AREA at a quarter of the cost.
    image = reformatter.reformat(frame, width=coded_width, height=coded_height, format="rgb24",
                                 interpolation="BILINEAR").to_ndarray()  # (coded_height, coded_width, 3)
    image = np.rot90(image, turns)  # (height, width, 3), a view
    top, left = (height - size) // 2, (width - size) // 2
    return image[top:top + size, left:left + size]  # (S, S, 3)


@dataclass
class FrameSampler:
    """Receives a stream's decoded frames in order and keeps only the sampled ones, resized."""

    frames: int
    """Slots T"""
    size: int
    """Output side S"""
    times: np.ndarray
    """Sampling times of the filled slots (from `sample_times`)"""
    source_fps: float | None = None
    output: np.ndarray = field(init=False)
    mask: np.ndarray = field(init=False)
    decoded: int = field(init=False, default=0)
    """Frames received (the stream's decoded frame count)"""
    _next: int = field(init=False, default=0)
    _start: float | None = field(init=False, default=None)
    _held: av.VideoFrame | None = field(init=False, default=None)
    _held_time: float = field(init=False, default=0.0)
    _reformatter: VideoReformatter = field(init=False, default_factory=VideoReformatter)

    def __post_init__(self) -> None:
        self.output = np.zeros((self.frames, self.size, self.size, 3), dtype=np.uint8)  # (T, S, S, 3)
        self.mask = np.zeros(self.frames, dtype=bool)  # (T,)

    def push(self, frame: av.VideoFrame) -> None:
        """Take the next decoded frame (presentation order)."""
        step = 1.0 / self.source_fps if self.source_fps else 0.04
        when = frame.time if frame.time is not None else self.decoded * step
        if self._start is None:
            self._start = when
        when -= self._start
        # The held frame stays on screen until this one: it fills every slot whose time falls before it.
        tolerance = 1e-3
        while self._held is not None and self._next < len(self.times) and self.times[self._next] < when - tolerance:
            self._fill(self._held)
        self._held, self._held_time = frame, when
        self.decoded += 1

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """Fill the slots covered by the last frame; returns (frames (T, S, S, 3) uint8, mask (T,) bool)."""
        if self._held is not None:
            step = 1.0 / self.source_fps if self.source_fps else 0.04
            end = self._held_time + step
            while self._next < len(self.times) and self.times[self._next] < end + 1e-3:
                self._fill(self._held)
        self._held = None
        return self.output, self.mask

    def _fill(self, frame: av.VideoFrame) -> None:
        self.output[self._next] = resize_crop(frame, self.size, self._reformatter)
        self.mask[self._next] = True
        self._next += 1


@dataclass
class VideoFacts:
    """What the file says about its first video stream."""

    codec: str
    width: int
    """Stored (coded) width, as ffprobe reports it; a quarter-turned stream is shown `height` wide"""
    height: int
    """Stored (coded) height"""
    fps: float | None
    duration: float | None
    header_frames: int
    """Frame count stated by the container (0 when it states none)"""


def video_facts(stream: av.VideoStream, container: av.container.InputContainer) -> VideoFacts:
    rate = stream.average_rate or stream.guessed_rate
    return VideoFacts(
        codec=stream.codec_context.name,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        fps=float(rate) if rate else None,
        duration=stream_duration(stream, container),
        header_frames=int(stream.frames or 0),
    )


def open_sampler(stream: av.VideoStream, container: av.container.InputContainer, frames: int, fps: float,
                 size: int, threads: int = 1) -> tuple[FrameSampler, VideoFacts]:
    """Prepare to decode `stream` into a sampler; one decoder thread (parallelism is across files)."""
    facts = video_facts(stream, container)
    stream.codec_context.thread_count = threads
    sampler = FrameSampler(frames, size, sample_times(facts.duration, frames, fps), facts.fps)
    return sampler, facts


@dataclass
class SampledVideo:
    """The sampled frames of a file's first video stream, with the stream's facts."""

    frames: np.ndarray
    """(T, S, S, 3) uint8 RGB"""
    mask: np.ndarray
    """(T,) bool: slots holding a frame"""
    facts: VideoFacts
    decoded: int
    """Frames decoded from the stream"""


def read_frames(path: Path, frames: int = 16, fps: float = 4.0, size: int = 64) -> SampledVideo:
    """Decode a file's first video stream and sample it (raises av.FFmpegError / ValueError on bad files)."""
    with av.open(str(path), metadata_errors="ignore") as container:
        stream = first_video_stream(container)
        if stream is None:
            raise ValueError(f"{path}: no video stream")
        sampler, facts = open_sampler(stream, container, frames, fps, size)
        for frame in container.decode(stream):
            sampler.push(frame)
        output, mask = sampler.finish()
    return SampledVideo(output, mask, facts, sampler.decoded)
