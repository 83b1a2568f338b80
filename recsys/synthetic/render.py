"""Rendering one synthetic video: frames with a moving shape, a rhythmic tone, an H.264 + AAC MP4.

Everything here is a pure function of a `VideoSpec` (its own seed included), so videos can be
rendered in any order, in any process, and come out identical.
"""

from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "diamond", "ring", "cross", "triangle")


@dataclass(frozen=True)
class VideoSpec:
    """What one synthetic video shows and sounds like."""

    file: str
    """Path relative to the corpus folder (videos/<item_id>.mp4)"""
    seed: int
    """Seed of the per-video noise (background texture, distractors, pixel and audio noise)"""
    size: int
    """Frame width and height in pixels"""
    fps: int
    """Frame rate of the file"""
    n_frames: int
    """Number of frames; the clip lasts n_frames / fps seconds"""
    hue: float
    """Hue in [0, 1) of the main shape"""
    shape: str
    """One of SHAPES"""
    radius: float
    """Half-size of the main shape in pixels"""
    start: tuple[float, float]
    """(x, y) pixel position of the shape's centre at time 0"""
    velocity: tuple[float, float]
    """(vx, vy) in pixels per second; the frame wraps around, so the shape never leaves it"""
    has_audio: bool
    """Whether the file gets an audio track"""
    sample_rate: int
    """Audio sample rate (Hz)"""
    band_hz: float
    """Frequency of the tone"""
    rhythm_hz: float
    """Pulses per second of the tone's loudness"""
    noise: float
    """Standard deviation of the white noise added to the audio"""

    @property
    def duration(self) -> float:
        return self.n_frames / self.fps

    @property
    def n_samples(self) -> int:
        return round(self.duration * self.sample_rate)


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255.0


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of a shape given each pixel's offset (dx, dy) from its centre."""
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= radius * 0.85
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= radius * 1.2
    if shape == "ring":
        distance = np.sqrt(dx**2 + dy**2)
        return (distance <= radius) & (distance >= radius * 0.55)
    if shape == "cross":
        arm = radius * 0.35
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    if shape == "triangle":
        # Apex up, base down: |dx| grows linearly from the apex to the base.
        return (dy >= -radius) & (dy <= radius * 0.8) & (np.abs(dx) <= (dy + radius) * 0.6)
    raise ValueError(f"unknown shape {shape!r}")


def render_frames(spec: VideoSpec) -> np.ndarray:
    """The clip's RGB frames: (n_frames, size, size, 3) uint8."""
    rng = np.random.default_rng([spec.seed, 1])
    size = spec.size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)  # (S, S)
    background = _rgb(rng.random(), 0.3, rng.uniform(0.15, 0.35))
    texture = rng.normal(0.0, 10.0, size=(size, size, 1)).astype(np.float32)  # (S, S, 1) static grain
    colour = _rgb(spec.hue, 0.9, 0.95)
    # Small distractors in random colours and directions: motion that says nothing about the topic.
    n_distractors = int(rng.integers(1, 3))
    d_start = rng.uniform(0, size, size=(n_distractors, 2))
    d_velocity = rng.normal(0.0, size * 0.25, size=(n_distractors, 2))
    d_colour = [_rgb(rng.random(), 0.6, 0.8) for _ in range(n_distractors)]
    d_radius = spec.radius * 0.3

    frames = np.empty((spec.n_frames, size, size, 3), dtype=np.uint8)
    for j in range(spec.n_frames):
        t = j / spec.fps
        image = np.broadcast_to(background, (size, size, 3)) + texture  # (S, S, 3)
        for k in range(n_distractors):
            cx, cy = (d_start[k] + d_velocity[k] * t) % size
            dx, dy = _wrapped(xs - cx, size), _wrapped(ys - cy, size)
            image = np.where(shape_mask("circle", dx, dy, d_radius)[..., None], d_colour[k], image)
        cx, cy = (np.array(spec.start) + np.array(spec.velocity) * t) % size
        dx, dy = _wrapped(xs - cx, size), _wrapped(ys - cy, size)
        image = np.where(shape_mask(spec.shape, dx, dy, spec.radius)[..., None], colour, image)
        image = image + rng.normal(0.0, 6.0, size=image.shape)
        frames[j] = np.clip(image, 0, 255).astype(np.uint8)
    return frames


def _wrapped(offset: np.ndarray, size: int) -> np.ndarray:
    """Shortest signed offset on a torus of the given size, so shapes wrap across the borders."""
    return (offset + size / 2) % size - size / 2


def render_audio(spec: VideoSpec) -> np.ndarray:
    """The clip's mono audio in [-1, 1]: a tone with a harmonic, pulsed at the rhythm, plus noise. (n,)"""
    rng = np.random.default_rng([spec.seed, 2])
    t = np.arange(spec.n_samples, dtype=np.float64) / spec.sample_rate
    phase, beat_phase = rng.uniform(0, 2 * np.pi, size=2)
    tone = np.sin(2 * np.pi * spec.band_hz * t + phase) + 0.4 * np.sin(4 * np.pi * spec.band_hz * t + phase)
    envelope = 0.15 + 0.85 * (0.5 + 0.5 * np.cos(2 * np.pi * spec.rhythm_hz * t + beat_phase)) ** 3
    signal = 0.25 * tone * envelope + spec.noise * rng.normal(size=t.shape)
    return np.clip(signal, -1.0, 1.0).astype(np.float32)


def write_mp4(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray | None, sample_rate: int) -> Path:
    """Encode frames (n, H, W, 3) as H.264 and optional mono audio as AAC into an MP4, atomically."""
    import av

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.part.mp4")
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            video = container.add_stream("libx264", rate=fps, options={
                "preset": "veryfast", "crf": "18", "threads": "1",
                # x264 otherwise sizes its lookahead threads from the CPU count and load.
                "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0",
            })
            video.width, video.height = frames.shape[2], frames.shape[1]
            video.pix_fmt = "yuv420p"
            # One encoder thread: x264's decisions depend on its thread count, so this keeps files
            # identical on any machine, and the corpus is parallel across processes anyway.
            video.codec_context.thread_count = 1
            video.codec_context.time_base = video.time_base = Fraction(1, fps)
            sound = None
            if audio is not None:
                sound = container.add_stream("aac", rate=sample_rate, layout="mono")
                sound.bit_rate = 48_000
            for index, image in enumerate(frames):
                # Converted to yuv420p here rather than implicitly by encode(): with the implicit
                # conversion (PyAV 18) the encoded bits depended on what the process had decoded or
                # muxed before, so the same seed did not always give the same frames.
                frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
                frame.pts, frame.time_base = index, Fraction(1, fps)
                container.mux(video.encode(frame))
            container.mux(video.encode(None))
            if sound is not None and audio is not None:
                block = 1024  # AAC's frame size
                for start in range(0, len(audio), block):
                    chunk = audio[start:start + block]
                    frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")  # (1, n)
                    frame.sample_rate, frame.pts, frame.time_base = sample_rate, start, Fraction(1, sample_rate)
                    container.mux(sound.encode(frame))
                container.mux(sound.encode(None))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def render_video(spec: VideoSpec, folder: Path) -> int:
    """Render and write one video under `folder`; returns the file's size in bytes."""
    path = Path(folder) / spec.file
    audio = render_audio(spec) if spec.has_audio else None
    write_mp4(path, render_frames(spec), spec.fps, audio, spec.sample_rate)
    return path.stat().st_size


def render_videos(specs: list[VideoSpec], folder: str) -> int:
    """Render a batch of videos (one process-pool task); returns their total size in bytes."""
    return sum(render_video(spec, Path(folder)) for spec in specs)
