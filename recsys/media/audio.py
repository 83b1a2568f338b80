"""Audio for the models: the first audio stream, mono at 16 kHz, as a fixed-length log-mel spectrogram.

Downmixing and resampling are FFmpeg's (PyAV's `AudioResampler`). The STFT (periodic Hann window,
centred frames, zero padding), the Slaney mel filterbank and the decibels are librosa's defaults,
written in numpy: librosa's first call in a process costs 1.7-3 s of lazy imports (numba, scipy.signal),
paid by every decoding worker, for a 15 ms computation (tests check the two agree).

The spectrogram covers the first `seconds` of the track: L = 1 + seconds * rate // hop frames; a
shorter track fills the first columns and leaves the rest 0 with mask False.
Values are decibels of power (10·log10, reference 1.0, floor -100 dB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import av
import numpy as np

FLOOR_DB = -100.0


def mel_frames(seconds: float, sample_rate: int, hop_length: int) -> int:
    """Spectrogram length L for `seconds` of audio (centred frames, as librosa computes them)."""
    return 1 + int(round(seconds * sample_rate)) // hop_length


@dataclass
class AudioCollector:
    """Receives decoded audio frames, downmixes to mono, resamples, and keeps the first `seconds`."""

    sample_rate: int
    seconds: float
    _resampler: av.AudioResampler = field(init=False)
    _chunks: list[np.ndarray] = field(init=False, default_factory=list)
    _kept: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self.sample_rate)

    @property
    def wanted(self) -> int:
        return int(round(self.seconds * self.sample_rate))

    @property
    def full(self) -> bool:
        """True once enough audio is kept: later packets need not be decoded."""
        return self._kept >= self.wanted

    def push(self, frame: av.AudioFrame | None) -> None:
        """Take the next decoded frame; None flushes the resampler."""
        for out in self._resampler.resample(frame):
            if self.full:
                break
            samples = out.to_ndarray().reshape(-1)  # (n,) packed mono float32
            samples = samples[: self.wanted - self._kept]
            self._chunks.append(samples)
            self._kept += len(samples)

    def finish(self) -> np.ndarray:
        """The mono samples kept: (n,) float32, n <= seconds * sample_rate."""
        if not self.full:
            self.push(None)
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._chunks).astype(np.float32, copy=False)


SLANEY_LINEAR_HZ = 200.0 / 3
"""Slaney's mel scale: linear below 1 kHz, one mel per 200/3 Hz ..."""
SLANEY_LOG_STEP = np.log(6.4) / 27.0
"""... and logarithmic above it, 27 mels per factor of 6.4."""
SLANEY_BREAK_HZ = 1000.0
SLANEY_BREAK_MEL = SLANEY_BREAK_HZ / SLANEY_LINEAR_HZ
"""Where the scale turns logarithmic, in mels (15)."""


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mels (librosa's `hz_to_mel`, htk=False) of frequencies in Hz."""
    hz = np.asarray(hz, dtype=np.float64)
    logarithmic = SLANEY_BREAK_MEL + np.log(np.maximum(hz, SLANEY_BREAK_HZ) / SLANEY_BREAK_HZ) / SLANEY_LOG_STEP
    return np.where(hz >= SLANEY_BREAK_HZ, logarithmic, hz / SLANEY_LINEAR_HZ)


def mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Frequencies in Hz of Slaney mels (the inverse of `hz_to_mel`)."""
    mels = np.asarray(mels, dtype=np.float64)
    logarithmic = SLANEY_BREAK_HZ * np.exp(SLANEY_LOG_STEP * (np.maximum(mels, SLANEY_BREAK_MEL) - SLANEY_BREAK_MEL))
    return np.where(mels >= SLANEY_BREAK_MEL, logarithmic, mels * SLANEY_LINEAR_HZ)


def mel_band_edges(sample_rate: int, n_mels: int) -> np.ndarray:
    """(n_mels + 2,) Hz: band i rises from edge i, peaks at edge i + 1 (its centre) and falls to edge i + 2."""
    return mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2.0), n_mels + 2))


@cache
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney mel filterbank (librosa's `filters.mel` defaults): (n_mels, n_fft // 2 + 1) float32 triangles
    over 0 .. sample_rate / 2, each scaled to unit area per Hz."""
    edges = mel_band_edges(sample_rate, n_mels)  # (M + 2,)
    bins = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)  # (F,)
    rising = (bins[None, :] - edges[:-2, None]) / np.diff(edges)[:-1, None]  # (M, F)
    falling = (edges[2:, None] - bins[None, :]) / np.diff(edges)[1:, None]  # (M, F)
    weights = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights


@cache
def hann_window(n_fft: int) -> np.ndarray:
    """The periodic Hann window of `n_fft` samples (float32), as spectral analysis uses it."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)).astype(np.float32)


def power_spectrogram(samples: np.ndarray, n_fft: int, hop_length: int) -> np.ndarray:
    """|STFT|² of centred frames (the signal zero-padded by n_fft // 2 on both sides):
    (n_fft // 2 + 1, 1 + len(samples) // hop_length) float32."""
    padded = np.pad(samples.astype(np.float32, copy=False), n_fft // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length]  # (T, n_fft) view
    spectrum = np.fft.rfft(frames * hann_window(n_fft), axis=1)  # (T, F) complex
    return (spectrum.real ** 2 + spectrum.imag ** 2).astype(np.float32).T  # (F, T)


def log_mel(samples: np.ndarray, sample_rate: int, n_mels: int, n_fft: int, hop_length: int, length: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel spectrogram padded to `length` frames: (mel (n_mels, L) float16, mask (L,) bool)."""
    out = np.zeros((n_mels, length), dtype=np.float16)  # (M, L)
    mask = np.zeros(length, dtype=bool)  # (L,)
    if samples.size == 0:
        return out, mask
    if samples.size < n_fft:
        # a full window is needed; zero samples after the end are what centring pads with anyway.
        samples = np.pad(samples, (0, n_fft - samples.size))
    power = mel_filterbank(sample_rate, n_fft, n_mels) @ power_spectrogram(samples, n_fft, hop_length)  # (M, T)
    db = 10.0 * np.log10(np.maximum(power, 10 ** (FLOOR_DB / 10)))  # (M, T) decibels, reference 1.0
    valid = min(length, db.shape[1])
    out[:, :valid] = db[:, :valid]
    mask[:valid] = True
    return out, mask


@dataclass
class AudioFacts:
    """What the file says about its first audio stream."""

    codec: str
    sample_rate: int
    channels: int


def audio_facts(stream: av.AudioStream) -> AudioFacts:
    context = stream.codec_context
    return AudioFacts(codec=context.name, sample_rate=int(context.sample_rate or 0), channels=int(context.channels))


@dataclass
class AudioTrack:
    """The first audio stream as mono samples at the target rate, with the stream's facts."""

    samples: np.ndarray
    """(n,) float32 in [-1, 1]"""
    sample_rate: int
    facts: AudioFacts


def read_audio(path: Path, sample_rate: int = 16_000, seconds: float = 4.0) -> AudioTrack | None:
    """Decode the first `seconds` of a file's first audio stream; None when it has none."""
    with av.open(str(path), metadata_errors="ignore") as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        collector = AudioCollector(sample_rate, seconds)
        for frame in container.decode(stream):
            collector.push(frame)
            if collector.full:
                break
        return AudioTrack(collector.finish(), sample_rate, audio_facts(stream))
