"""flux: FLUX.1 from scratch in pure PyTorch."""

from flux.checkpoint import CheckpointError
