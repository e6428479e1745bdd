"""FLUX.1 Redux: images as extra prompt tokens. SigLIP's patch states, projected to T5's width.

FLUX.1-Redux-dev (Black Forest Labs, 2024) adds no layer to the transformer. A small MLP, the "Redux image
encoder" (BFL's `ReduxImageEncoder` in `flux/modules/image_embedders.py`, diffusers' of the same name), maps each
of SigLIP so400m's 729 patch states (1152 wide) to a 4096-wide token that looks to the transformer like one more
T5 token: `redux_down(silu(redux_up(x)))`, through a 3 × 4096 = 12288-wide hidden layer. The pipeline appends
those tokens after the prompt's T5 tokens (flux/pipelines/redux.py). Matches diffusers' `ReduxImageEncoder` and
`FluxPriorReduxPipeline` (tests/test_redux.py).

Attribute names spell `flux1-redux-dev.safetensors` (`redux_up.weight`), which diffusers' `image_embedder/`
stores under the same names.

Axes: B batch, N image tokens (729), C SigLIP's width (1152), T T5's width (4096).
"""

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from flux.modules.siglip import SiglipVisionModel


@dataclass(frozen=True)
class ReduxEmbedderConfig:
    redux_dim: int  # SigLIP's width, 1152
    txt_in_features: int  # the transformer's text width (T5's), 4096; the hidden layer is 3 times it

    def __post_init__(self):
        for name in ("redux_dim", "txt_in_features"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"ReduxEmbedderConfig.{name} must be a positive integer, got {value!r}")


REDUX_DEV = ReduxEmbedderConfig(redux_dim=1152, txt_in_features=4096)


class Redux(nn.Module):
    """Images -> (B, 729, 4096) text-width tokens: preprocessing, `image_encoder` (SigLIP), `image_embedder`.

    `preprocess` is a callable images -> (B, 3, S, S) fp32 pixel values on the CPU (flux/weights/redux.py builds
    it from the repository's `feature_extractor/`; file formats and Pillow belong to the floor above this one).
    Load the official weights with `flux.load_redux`.
    """

    def __init__(self, image_encoder: SiglipVisionModel, image_embedder: "ReduxImageEmbedder", preprocess):
        super().__init__()
        if image_embedder.redux_up.in_features != image_encoder.config.hidden_size:
            raise ValueError(f"the Redux embedder takes {image_embedder.redux_up.in_features}-wide states, but the "
                             f"SigLIP encoder gives {image_encoder.config.hidden_size}")
        self.image_encoder, self.image_embedder, self._preprocess = image_encoder, image_embedder, preprocess

    @property
    def token_width(self) -> int:
        """The tokens' width, which must be the transformer's text width (`context_in_dim`)."""
        return self.image_embedder.redux_down.out_features

    def preprocess(self, images) -> Tensor:
        """PIL image(s) -> (B, 3, S, S) fp32 pixel values in [-1, 1] on the CPU, S the encoder's image_size."""
        return self._preprocess(images)

    def forward(self, images) -> Tensor:
        """PIL image(s) -> (B, N, T) tokens, in the embedder's dtype, on its device."""
        return self.encode(self.preprocess(images))

    def encode(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, S, S) preprocessed pixel values (on any device) -> (B, N, T) tokens."""
        return self.image_embedder(self.image_encoder(pixel_values))


class ReduxImageEmbedder(nn.Module):
    def __init__(self, config: ReduxEmbedderConfig):
        super().__init__()
        self.redux_up = nn.Linear(config.redux_dim, 3 * config.txt_in_features)
        self.redux_down = nn.Linear(3 * config.txt_in_features, config.txt_in_features)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, C) SigLIP states -> (B, N, T) tokens."""
        return self.redux_down(F.silu(self.redux_up(x.to(self.redux_up.weight.dtype))))
