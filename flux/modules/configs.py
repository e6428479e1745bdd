"""Named presets: the official FLUX.1 checkpoints' configurations, and a tiny one for tests.

`configs["flux-schnell"]` and `configs["flux-dev"]` hold what differs between the two releases: the
transformer's guidance embedding, the number of steps, the guidance scale, whether the schedule is
shifted toward high noise for larger images, and how many T5 tokens the prompt gets. The FLUX.1 family
(Fill, Canny, Depth, Kontext; ../shared/manifests/README.md) are dev with a wider `img_in` or none, and
their own sampling defaults: Black Forest Labs' published settings.
"""

from dataclasses import dataclass, replace

from flux.modules.autoencoder import AutoEncoderParams
from flux.modules.transformer import FluxParams


@dataclass(frozen=True)
class SamplingDefaults:
    num_steps: int
    guidance: float | None  # None: the model has no guidance embedding
    shift_schedule: bool  # dev's resolution-dependent shift; schnell was distilled on the plain schedule
    max_sequence_length: int  # T5 tokens: schnell was trained with 256, dev with 512
    base_shift: float = 0.5  # mu at 256 image tokens (256² pixels) ...
    max_shift: float = 1.15  # ... and at 4096 image tokens (1024² pixels)
    image_size: int = 1024  # width and height when none are given


@dataclass(frozen=True)
class ModelSpec:
    params: FluxParams
    ae_params: AutoEncoderParams
    sampling: SamplingDefaults


FLUX_SCHNELL = FluxParams(
    in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
    num_heads=24, depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56), theta=10_000, qkv_bias=True,
    guidance_embed=False,
)

configs = {
    "flux-schnell": ModelSpec(
        params=FLUX_SCHNELL,
        ae_params=AutoEncoderParams(),
        sampling=SamplingDefaults(num_steps=4, guidance=None, shift_schedule=False, max_sequence_length=256),
    ),
    "flux-dev": ModelSpec(
        params=replace(FLUX_SCHNELL, guidance_embed=True),
        ae_params=AutoEncoderParams(),
        sampling=SamplingDefaults(num_steps=50, guidance=3.5, shift_schedule=True, max_sequence_length=512),
    ),
}
DEV = configs["flux-dev"]
# Fill sees 64 noisy + 64 masked-image + 256 mask channels per token, Canny/Depth 64 + 64 control channels;
# Kontext's reference enters as extra tokens, so its img_in is dev's. BFL's defaults: Fill and Canny guidance
# 30, Depth 10 (50 steps), Kontext 2.5 with 28 steps.
configs |= {
    "flux-fill-dev": replace(DEV, params=replace(DEV.params, in_channels=384), sampling=replace(DEV.sampling, guidance=30.0)),
    "flux-canny-dev": replace(DEV, params=replace(DEV.params, in_channels=128), sampling=replace(DEV.sampling, guidance=30.0)),
    "flux-depth-dev": replace(DEV, params=replace(DEV.params, in_channels=128), sampling=replace(DEV.sampling, guidance=10.0)),
    "flux-kontext-dev": replace(DEV, sampling=replace(DEV.sampling, guidance=2.5, num_steps=28)),
}

# For tests: the real head dim (128) and rotary axes, everything else small and deliberately unequal
# (3 heads, 2 double vs 3 single blocks, context 48 vs vector 40) so that swapped axes fail loudly.
TINY = replace(FLUX_SCHNELL, vec_in_dim=40, context_in_dim=48, hidden_size=384, num_heads=3, depth=2,
               depth_single_blocks=3)
