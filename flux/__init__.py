"""flux: FLUX.1 from scratch in pure PyTorch."""

from flux.checkpoint import CheckpointError
from flux.configs import configs
from flux.loading import load_autoencoder, load_clip, load_flow_model, load_t5
from flux.model import Flux, FluxParams
from flux.pipeline import Pipeline, generate
