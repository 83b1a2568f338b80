"""Frame sampling: which source frames land in which slots, resizing, cropping, rotation, real codecs."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from recsys.media.video import quarter_turns, read_frames, resize_crop, sample_times
from recsys.synthetic.render import write_mp4


def _numbered_clip(path: Path, n_frames: int, fps: int, size: tuple[int, int] = (64, 48)) -> Path:
    """A clip whose frame j is a flat grey of brightness 8 * j: each decoded frame says which it was."""
    width, height = size
    frames = np.stack([np.full((height, width, 3), 8 * j, dtype=np.uint8) for j in range(n_frames)])
    return write_mp4(path, frames, fps, None, 16_000)


def _frame_numbers(frames: np.ndarray, mask: np.ndarray) -> list[int]:
    return [round(float(frame.mean()) / 8) for frame in frames[mask]]


def _remux(source: Path, path: Path, rotation: int | None) -> Path:
    """The source's video packets, unchanged, in a new MP4; with a display-matrix rotation when given.

    Tagged and untagged twins made this way hold identical coded pictures, so any difference in
    their decoded frames comes from the tag alone.
    """
    with av.open(str(source)) as src, av.open(str(path), "w") as dst:
        stream = src.streams.video[0]
        out = dst.add_stream_from_template(stream)
        if rotation is not None:
            out.set_display_rotation(rotation)  # counter-clockwise degrees, as VideoFrame.rotation reads back
        for packet in src.demux(stream):
            if packet.dts is None:  # the demuxer's end-of-stream flush packet
                continue
            packet.stream = out
            dst.mux(packet)
    return path


def test_sample_times_follow_the_rate_or_spread_over_long_clips() -> None:
    np.testing.assert_allclose(sample_times(2.0, 16, 4.0), np.arange(8) / 4)
    np.testing.assert_allclose(sample_times(8.0, 4, 4.0), [0.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(sample_times(0.04, 16, 4.0), [0.0])  # a single frame still gives one slot
    np.testing.assert_allclose(sample_times(None, 3, 2.0), [0.0, 0.5, 1.0])


def test_short_clip_is_sampled_at_the_target_rate_and_padded(tmp_path: Path) -> None:
    clip = _numbered_clip(tmp_path / "short.mp4", n_frames=30, fps=10)  # 3 s
    sampled = read_frames(clip, frames=16, fps=4.0, size=32)
    assert sampled.frames.shape == (16, 32, 32, 3)
    assert sampled.mask.tolist() == [True] * 12 + [False] * 4
    # Slot k shows the frame on screen at k / 4 s, i.e. source frame floor(2.5 k).
    assert _frame_numbers(sampled.frames, sampled.mask) == [int(2.5 * k) for k in range(12)]
    assert not sampled.frames[~sampled.mask].any()
    assert sampled.decoded == 30 and sampled.facts.fps == 10


def test_long_clip_is_sampled_evenly_over_its_whole_length(tmp_path: Path) -> None:
    clip = _numbered_clip(tmp_path / "long.mp4", n_frames=30, fps=10)
    sampled = read_frames(clip, frames=8, fps=4.0, size=32)
    assert sampled.mask.all()
    assert _frame_numbers(sampled.frames, sampled.mask) == [int(k * 30 / 8) for k in range(8)]


def test_single_frame_video_fills_one_slot(tmp_path: Path) -> None:
    clip = _numbered_clip(tmp_path / "one.mp4", n_frames=1, fps=10)
    sampled = read_frames(clip, frames=16, fps=4.0, size=32)
    assert sampled.mask.tolist() == [True] + [False] * 15


def test_resize_keeps_the_centre_of_a_wide_frame() -> None:
    # Three vertical bands (red | green | blue) on a 4K frame: the square centre crop keeps all of
    # green and only the inner edges of red and blue.
    image = np.zeros((2160, 3840, 3), dtype=np.uint8)
    image[:, :1280, 0] = image[:, 1280:2560, 1] = image[:, 2560:, 2] = 255
    out = resize_crop(av.VideoFrame.from_ndarray(image, format="rgb24"), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[32, 32].argmax() == 1 and out[32, 0].argmax() == 0 and out[32, 63].argmax() == 2
    # 16:9 at height 64 is 114 wide: the crop starts 25 px in, the red band ends at 38.
    assert (out[32, :, 0] > 200).sum() == pytest.approx(13, abs=1)


@pytest.mark.parametrize("name", ["videos/torchcodec/nasa_13013.mp4", "videos/moviepy/big_buck_bunny_432_433.webm",
                                  "videos/moviepy/example3.mp4"])
def test_real_clips_decode_their_first_video_stream(shared_data: Path, name: str) -> None:
    probe = {entry["file"]: entry for entry in json.loads((shared_data / "video_probe.json").read_text())}[name]
    first = next(s for s in probe["streams"] if s["type"] == "video")
    sampled = read_frames(shared_data / name, frames=16, fps=4.0, size=48)
    assert sampled.facts.codec == first["codec"]
    assert (sampled.facts.width, sampled.facts.height) == (first["width"], first["height"])
    assert sampled.facts.fps == pytest.approx(first["avg_fps"])
    assert sampled.decoded == first["decoded_frames"]
    expected_slots = min(16, int(probe["duration_s"] * 4 + 1e-6))
    assert sampled.mask.sum() == pytest.approx(expected_slots, abs=1)
    assert sampled.frames[sampled.mask].std() > 5, "real pictures, not blank slots"


def test_quarter_turns_follow_the_counter_clockwise_rotation() -> None:
    assert [quarter_turns(r) for r in (0, 90, 180, -180, -90, 270, -270, 89.6)] == [0, 1, 2, 2, 3, 3, 1, 1]


# ffmpeg shows a clip tagged r degrees as its stored picture turned r counter-clockwise. Checked
# once by hand with ffmpeg 5.1 on these twins: `ffmpeg -i tagged.mp4` (autorotate on) gave exactly
# np.rot90(stored, r // 90), and for -90 the same as `-noautorotate -vf transpose=clock`.
@pytest.mark.parametrize(("rotation", "turns"), [(90, 1), (-90, 3), (270, 3), (180, 2)])
def test_rotated_clip_decodes_as_its_twin_turned(shared_data: Path, tmp_path: Path, rotation: int,
                                                 turns: int) -> None:
    source = shared_data / "videos/torchcodec/nasa_13013.mp4"  # 320x180 landscape
    plain = read_frames(_remux(source, tmp_path / "plain.mp4", None), frames=8, fps=4.0, size=72)
    tagged = read_frames(_remux(source, tmp_path / "tagged.mp4", rotation), frames=8, fps=4.0, size=72)
    assert tagged.mask.tolist() == plain.mask.tolist() and plain.mask.all()
    # At size 72 a 16:9 picture is 128 long, so both centre crops keep the same 28-pixel margins
    # and the turned frames agree to within rounding (odd margins would shift the crop by one).
    expected = np.rot90(plain.frames, turns, axes=(1, 2))  # (T, S, S, 3)
    np.testing.assert_allclose(tagged.frames.astype(int), expected.astype(int), atol=1)
    for wrong in {0, 1, 2, 3} - {turns}:
        other = np.rot90(plain.frames, wrong, axes=(1, 2)).astype(int)
        assert np.abs(tagged.frames.astype(int) - other).mean() > 10, f"also matches k={wrong}"
    assert (tagged.facts.width, tagged.facts.height) == (320, 180), "facts keep the stored size"


@pytest.mark.parametrize(("rotation", "first", "last", "bands"), [
    (-90, 0, 2, "rows"),  # a phone held upright: stored landscape, turned clockwise to show
    (90, 2, 0, "rows"),
    (180, 2, 0, "columns"),  # upside down: left and right swap, the bands stay vertical
])
def test_rotation_is_applied_before_the_shorter_side_is_scaled_and_cropped(
        tmp_path: Path, rotation: int, first: int, last: int, bands: str) -> None:
    # Stored 96x48 with vertical bands red | green | blue. Turned a quarter, it shows 48x96 with
    # horizontal bands: the 48-wide side is scaled to 32 and the crop keeps the middle 32 rows of
    # the 64-high picture, i.e. all of green and 16/3 rows of each outer band.
    image = np.zeros((48, 96, 3), dtype=np.uint8)
    image[:, :32, 0] = image[:, 32:64, 1] = image[:, 64:, 2] = 255
    stored = write_mp4(tmp_path / "bands.mp4", np.stack([image] * 4), 4, None, 16_000)
    out = read_frames(_remux(stored, tmp_path / "tagged.mp4", rotation), frames=1, fps=4.0, size=32).frames[0]
    along = out if bands == "columns" else out.transpose(1, 0, 2)  # bands now run left to right
    colour = along.argmax(axis=2)  # (32, 32)
    assert (colour[:, 0] == first).all() and (colour[:, 16] == 1).all() and (colour[:, 31] == last).all()
    # Green spans 64/3 of the crop's 32 pixels (chroma subsampling blurs each edge by a pixel).
    assert (colour[16] == 1).sum() == pytest.approx(64 / 3, abs=1.5), "cropped on the displayed geometry"
    assert (colour == colour[:1]).all(), "bands run straight across the other way"
