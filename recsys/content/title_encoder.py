"""Title encoder: a trained projection of the cached MiniLM sentence embedding.

The sentence model stays frozen and is never run during training: `recsys ingest` stores its
384-d output per video, and only this small projection learns.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from recsys.errors import MissingInputError
from recsys.files import atomic_path

SENTENCE_DIM = 384
"""Size of the all-MiniLM-L6-v2 sentence embedding stored in the feature store."""


class TitleEncoder(nn.Module):
    """Cached sentence embedding (B, 384) → title embedding (B, out_dim)."""

    def __init__(self, out_dim: int, in_dim: int = SENTENCE_DIM, hidden_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, sentence: Tensor) -> Tensor:
        return self.net(sentence)  # (B, D)


TITLE_PROJECTION_FILE = "title_projection.safetensors"
"""The trained projection, saved beside the content embeddings so that search can embed a text query."""


def save_title_projection(encoder: TitleEncoder, folder: Path) -> Path:
    """Write the projection's weights to `folder/title_projection.safetensors` (no pickle)."""
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in encoder.state_dict().items()}
    path = Path(folder) / TITLE_PROJECTION_FILE
    with atomic_path(path) as tmp:
        save_file(state, tmp)
    return path


def load_title_projection(folder: Path) -> TitleEncoder:
    """The projection `save_title_projection` wrote into `folder`, in eval mode; its sizes read from the weights."""
    path = Path(folder) / TITLE_PROJECTION_FILE
    if not path.exists():
        raise MissingInputError(f"no trained title projection at {path}: (re)train the content model "
                                f"(`recsys train content {Path(folder).parent.name}`) to write it")
    state = load_file(path)
    hidden, in_dim = state["net.1.weight"].shape
    out_dim = state["net.3.weight"].shape[0]
    encoder = TitleEncoder(int(out_dim), in_dim=int(in_dim), hidden_dim=int(hidden))
    encoder.load_state_dict(state)
    return encoder.eval()
