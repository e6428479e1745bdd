"""flux: FLUX.1 from scratch in pure PyTorch."""

from flux.weights.checkpoint import CheckpointError
from flux.modules.configs import configs
from flux.weights.loading import load_autoencoder, load_clip, load_flow_model, load_t5
from flux.modules.transformer import Flux, FluxParams
from flux.pipelines.pipeline import Pipeline, generate
from flux.pipelines.redux import load_redux
from flux.training import TrainConfig, TrainResult, train
