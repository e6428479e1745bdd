"""Floor 3, fine-tuning: the rectified-flow objective, data and latent caches, the training loop, checkpoints,
and the coloured-shapes data set of the built-in model. `python -m flux.training` is `flux train`.

May import every floor below it; nothing below imports it.
"""

from flux.training.config import TrainConfig
from flux.training.loop import TrainResult, train
