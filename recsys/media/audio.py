"""Audio for the models: the first audio stream, mono at 16 kHz, as a fixed-length log-mel spectrogram.

Downmixing and resampling are FFmpeg's (PyAV's `AudioResampler`); the mel filterbank and STFT are
librosa's. The spectrogram covers the first `seconds` of the track: L = 1 + seconds * rate // hop
frames; a shorter track fills the first columns and leaves the rest 0 with mask False.
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


@cache
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """librosa's Slaney mel filterbank: (n_mels, n_fft // 2 + 1) float32."""
    import librosa

    return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels).astype(np.float32)


def log_mel(samples: np.ndarray, sample_rate: int, n_mels: int, n_fft: int, hop_length: int, length: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Log-mel spectrogram padded to `length` frames: (mel (n_mels, L) float16, mask (L,) bool)."""
    import librosa

    out = np.zeros((n_mels, length), dtype=np.float16)  # (M, L)
    mask = np.zeros(length, dtype=bool)  # (L,)
    if samples.size == 0:
        return out, mask
    if samples.size < n_fft:
        # librosa needs a full window; zero samples after the end are what centring pads with anyway.
        samples = np.pad(samples, (0, n_fft - samples.size))
    spectrum = np.abs(librosa.stft(samples.astype(np.float32), n_fft=n_fft, hop_length=hop_length,
                                   center=True)) ** 2  # (n_fft // 2 + 1, frames) power
    # What librosa.feature.melspectrogram computes, with the filterbank built once per setting and a
    # plain matrix product (its einsum is several times slower on these small matrices).
    power = mel_filterbank(sample_rate, n_fft, n_mels) @ spectrum  # (M, frames)
    db = librosa.power_to_db(power, ref=1.0, amin=10 ** (FLOOR_DB / 10), top_db=None)  # (M, frames)
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
