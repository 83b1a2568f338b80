"""Content encoders on random tensors of the feature store's shapes: shapes, masking, missing modalities,
weights from a local file, freezing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from recsys.config import ConfigError
from recsys.content.audio_encoder import AudioEncoder
from recsys.content.encoder import MODALITIES, ContentEncoder, ContentInputs, EncoderSpec
from recsys.content.frame_cnn import FrameCNN, build_backbone, spatial_soft_argmax
from recsys.content.fusion import ModalityFusion, drop_modalities
from recsys.content.temporal import TemporalEncoder
from recsys.errors import DataFormatError, MissingInputError
from recsys.threads import torch_threads

T, S, N_MELS, L = 6, 32, 16, 40


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster than several contending for a shared CPU."""
    with torch_threads(1):
        yield


def make_inputs(b: int = 4, seed: int = 0) -> ContentInputs:
    """A batch with every modality present and full-length clips."""
    g = torch.Generator().manual_seed(seed)
    return ContentInputs(
        frames=torch.randint(0, 256, (b, T, S, S, 3), generator=g, dtype=torch.uint8),
        frame_mask=torch.ones(b, T, dtype=torch.bool),
        mel=torch.randn(b, N_MELS, L, generator=g).half(),
        mel_mask=torch.ones(b, L, dtype=torch.bool),
        title=torch.randn(b, 384, generator=g),
        title_mask=torch.ones(b, dtype=torch.bool),
        item_idx=torch.arange(b),
    )


def encoder(**spec: object) -> ContentEncoder:
    torch.manual_seed(0)
    return ContentEncoder(EncoderSpec(embedding_dim=16, hidden_dim=32, n_mels=N_MELS, **spec)).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("fusion", ["gated", "attention"])
@pytest.mark.parametrize("temporal", ["gru", "mean"])
def test_output_shapes_and_unit_length(fusion: str, temporal: str) -> None:
    out = encoder(fusion=fusion, temporal=temporal)(make_inputs(b=3))
    assert out.stacked.shape == (3, len(MODALITIES), 16)
    assert out.mask.all()
    assert out.fused.shape == (3, 16)
    torch.testing.assert_close(out.fused.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.stacked.norm(dim=-1), torch.ones(3, len(MODALITIES)))


@pytest.mark.parametrize("backbone,dim", [("small", 3 * 64), ("mobilenet_v3_small", 3 * 576), ("resnet18", 3 * 512)])
def test_each_backbone_gives_one_feature_vector_per_frame(backbone: str, dim: int) -> None:
    cnn = FrameCNN(backbone).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        features = cnn(torch.rand(5, 3, 64, 64))
    assert cnn.out_dim == dim
    assert features.shape == (5, dim)


def test_spatial_soft_argmax_finds_each_channels_peak() -> None:
    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, 1, 3] = 30.0  # channel 0 peaks at row 1, column 3
    maps[0, 1, 3, 0] = 30.0  # channel 1 peaks at row 3, column 0
    where = spatial_soft_argmax(maps, torch.zeros(2))  # (1, 2, 2)
    torch.testing.assert_close(where[0], torch.tensor([[1.0, -1 / 3], [-1.0, 1.0]]), atol=1e-4, rtol=0)


def test_frame_features_say_where_things_are() -> None:
    """Moving an object sideways changes the x coordinates of the features more than their y or appearance."""
    torch.manual_seed(0)
    cnn = FrameCNN("small").eval()
    c = cnn.channels
    features = []
    for left in (4, 44):
        image = torch.zeros(1, 3, 64, 64)
        image[..., 24:40, left:left + 16] = 1.0
        with torch.no_grad():
            features.append(cnn(image)[0])
    change = (features[0] - features[1]).abs()
    assert change[c:2 * c].mean() > 2 * change[:c].mean()  # x coordinates move, appearance barely
    assert change[c:2 * c].mean() > 2 * change[2 * c:].mean()  # and y hardly
    moved = cnn.translate(torch.zeros(2, 3 * c), torch.tensor([[0.5, -0.25], [0.0, 0.0]]))
    assert moved[0, c:2 * c].eq(0.5).all() and moved[0, 2 * c:].eq(-0.25).all() and moved[0, :c].eq(0).all()


@pytest.mark.parametrize("temporal", ["gru", "mean"])
def test_padded_frames_do_not_change_the_embedding(temporal: str) -> None:
    model = encoder(temporal=temporal)
    inputs = make_inputs(b=2)
    short = ContentInputs(
        **{**inputs.__dict__, "frames": inputs.frames[:, :4], "frame_mask": inputs.frame_mask[:, :4]}
    )
    padded_frames = inputs.frames.clone()
    padded_frames[:, 4:] = 255  # garbage in the padded slots
    mask = inputs.frame_mask.clone()
    mask[:, 4:] = False
    padded = ContentInputs(**{**inputs.__dict__, "frames": padded_frames, "frame_mask": mask})
    with torch.no_grad():
        a, b = model(short), model(padded)
    torch.testing.assert_close(a.stacked, b.stacked)
    torch.testing.assert_close(a.fused, b.fused)


def test_gru_sees_frame_order_and_mean_pooling_does_not() -> None:
    features = torch.randn(2, T, 8)
    mask = torch.ones(2, T, dtype=torch.bool)
    reversed_features = features.flip(1)
    torch.manual_seed(0)
    gru = TemporalEncoder(8, 4, hidden_dim=16, kind="gru")
    mean = TemporalEncoder(8, 4, hidden_dim=16, kind="mean")
    with torch.no_grad():
        assert not torch.allclose(gru(features, mask), gru(reversed_features, mask))
        torch.testing.assert_close(mean(features, mask), mean(reversed_features, mask))


def test_gru_mask_need_not_be_a_prefix() -> None:
    """Valid frames scattered among padding are read in order, as if they were contiguous."""
    torch.manual_seed(0)
    gru = TemporalEncoder(8, 4, hidden_dim=16, kind="gru", bidirectional=True)
    features = torch.randn(1, 3, 8)
    scattered = torch.zeros(1, 5, 8)
    scattered[0, [0, 2, 4]] = features[0]
    mask = torch.tensor([[True, False, True, False, True]])
    with torch.no_grad():
        torch.testing.assert_close(gru(features, torch.ones(1, 3, dtype=torch.bool)), gru(scattered, mask))


def test_audio_padding_does_not_change_the_embedding() -> None:
    torch.manual_seed(0)
    audio = AudioEncoder(N_MELS, 16, channels=8, hidden_dim=32).eval()
    mel = torch.randn(2, N_MELS, 25)
    padded = torch.cat([mel, torch.randn(2, N_MELS, 15) * 10], dim=2)  # (2, M, 40) with loud garbage
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[:, :25] = True
    with torch.no_grad():
        torch.testing.assert_close(audio(mel, torch.ones(2, 25, dtype=torch.bool)), audio(padded, mask))


def test_missing_audio_and_title_still_give_an_embedding_from_what_is_there() -> None:
    model = encoder()
    inputs = make_inputs(b=3)
    inputs.mel_mask[0] = False  # item 0: no audio track
    inputs.title_mask[1] = False  # item 1: no title
    inputs.title[1] = 0.0
    other = ContentInputs(**{**inputs.__dict__, "mel": torch.randn_like(inputs.mel.float()).half()})
    with torch.no_grad():
        out, out_other_audio = model(inputs), model(other)
    assert out.mask[0].tolist() == [True, True, False, True]
    assert out.mask[1].tolist() == [True, True, True, False]
    assert torch.isfinite(out.fused).all()
    torch.testing.assert_close(out.fused.norm(dim=-1), torch.ones(3))
    assert out.stacked[0, MODALITIES.index("audio")].abs().sum() == 0
    # The silent item's fused embedding ignores whatever the (absent) spectrogram holds.
    torch.testing.assert_close(out.fused[0], out_other_audio.fused[0])
    assert not torch.allclose(out.fused[2], out_other_audio.fused[2])


def test_item_without_any_frame_has_no_video_modalities() -> None:
    model = encoder()
    inputs = make_inputs(b=2)
    inputs.frame_mask[0] = False
    inputs.frame_mask[1, 1:] = False  # a single frame: appearance yes, motion no
    with torch.no_grad():
        out = model(inputs)
    assert out.mask[:, :2].tolist() == [[False, False], [True, False]]
    assert torch.isfinite(out.fused).all()


@pytest.mark.parametrize("kind", ["gated", "attention"])
def test_fusion_ignores_masked_modalities_and_zeroes_empty_rows(kind: str) -> None:
    torch.manual_seed(0)
    fusion = ModalityFusion(8, 3, kind=kind).eval()  # type: ignore[arg-type]
    x = torch.randn(2, 3, 8)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    changed = x.clone()
    changed[0, 1] = 100.0
    with torch.no_grad():
        a, b = fusion(x, mask), fusion(changed, mask)
    torch.testing.assert_close(a[0], b[0])
    assert a[1].abs().sum() == 0
    weights = fusion.modality_weights(x, mask)
    torch.testing.assert_close(weights[0].sum(), torch.tensor(1.0))
    assert weights[0, 1] == 0


def test_modality_dropout_only_hides_present_modalities_and_keeps_one() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(500, 4, generator=g) > 0.3
    dropped = drop_modalities(mask, 0.7, generator=g)
    assert not (dropped & ~mask).any()  # nothing appears that was missing
    assert (dropped.any(1) == mask.any(1)).all()  # every item with a modality keeps one
    assert dropped.sum() < 0.6 * mask.sum()


def test_weights_load_from_a_local_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = FrameCNN("small")
    path = tmp_path / "small.pt"
    torch.save(source.backbone.state_dict(), path)
    loaded = FrameCNN("small", weights=path)
    for (name, a), b in zip(source.backbone.state_dict().items(), loaded.backbone.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, msg=name)
    images = torch.rand(2, 3, S, S)
    with torch.no_grad():
        torch.testing.assert_close(source.eval()(images), loaded.eval()(images))


def test_torchvision_classifier_checkpoint_loads_without_its_head(tmp_path: Path) -> None:
    """A full torchvision mobilenet state dict (as torchvision ships it) fits the headless backbone."""
    torch.manual_seed(2)
    full = torchvision.models.mobilenet_v3_small()
    path = tmp_path / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    net, dim = build_backbone("mobilenet_v3_small", path)
    torch.testing.assert_close(net.net.features[0][0].weight, full.features[0][0].weight)
    assert dim == 576


def test_bad_weights_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingInputError, match="does not exist"):
        build_backbone("small", tmp_path / "missing.pt")
    wrong = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18().state_dict(), wrong)
    with pytest.raises(DataFormatError, match="do not fit the backbone"):
        build_backbone("small", wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataFormatError, match="cannot read"):
        build_backbone("small", garbage)
    with pytest.raises(ConfigError, match="no torchvision weights"):
        build_backbone("small", "DEFAULT")
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        build_backbone("resnet18", "IMAGENET22K")


def test_frozen_backbone_gets_no_gradient_and_keeps_its_statistics() -> None:
    cnn = FrameCNN("small", freeze=True).train()
    before = cnn.backbone.net.features[1].running_mean.clone()
    head = torch.nn.Linear(cnn.out_dim, 1)
    head(cnn(torch.rand(4, 3, S, S))).sum().backward()
    assert head.weight.grad is not None
    assert all(p.grad is None for p in cnn.backbone.parameters())
    assert not cnn.backbone.training
    torch.testing.assert_close(cnn.backbone.net.features[1].running_mean, before)
