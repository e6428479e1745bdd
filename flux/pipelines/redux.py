"""The text side of a generation request: a prompt, precomputed embeddings, or neither, plus Redux's image tokens.

`Pipeline.__call__` turns whatever the caller gave into the two text inputs of the transformer, `txt` (B, T, 4096)
and `vec` (B, 768), in three steps:
  1. `check_text_inputs` (before any heavy work): exactly one of `prompt` / `prompt_embeds` (or neither, with
     Redux images), shapes against the transformer's widths, Redux images against the Redux model.
  2. The pipeline encodes the prompts with T5 and CLIP (`Pipeline.encode_prompt`), or takes `prompt_embeds` and
     `pooled_prompt_embeds` as given, or, with neither, uses zeros (T5 tokens and pooled vector) as diffusers'
     `FluxPriorReduxPipeline` does when it has no text encoders.
  3. `TextInputs.condition` appends each prompt's Redux tokens after its T5 tokens (their position ids are zeros,
     like every text token's, so their order carries no rotary position) and multiplies `txt` by
     `prompt_embeds_scale` and `vec` by `pooled_prompt_embeds_scale`, diffusers' `FluxPriorReduxPipeline` scales.

FLUX.1 Redux (manifests/README.md, redux.json): each image gives 729 tokens (SigLIP so400m's patch states
projected to 4096 by the Redux embedder, flux/modules/redux.py); several images per prompt are concatenated,
first image first. diffusers' `FluxPriorReduxPipeline` instead sums the embeddings of several images (text tokens
included) into one; one image per prompt is the same in both (tests/test_redux.py).

Axes: P prompts, B = P × images per prompt, T text tokens (T5's, then Redux's), K Redux images per prompt,
N tokens per Redux image (729), W the text width (4096).
"""

from dataclasses import dataclass

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from flux.modules.redux import Redux
from flux.modules.transformer import FluxParams
from flux.pipelines.devices import default_device, default_dtype
from flux.pipelines.requests import is_number
from flux.pipelines.snapshots import resolve_snapshot
from flux.weights.redux import REDUX_FILES, read_redux


def load_redux(folder_or_repo, *, device=None, dtype=None) -> Redux:
    """FLUX.1 Redux from a FLUX.1-Redux-dev folder, its `flux1-redux-dev.safetensors`, or a repo id in the Hugging
    Face cache ("black-forest-labs/FLUX.1-Redux-dev"). `device` and `dtype` None: as `Pipeline.from_pretrained`
    chooses (the best device; bf16 where it is fast). See flux/weights/redux.py for the layouts."""
    root = resolve_snapshot(folder_or_repo, patterns=REDUX_FILES)
    device = torch.device(device) if device is not None else default_device()
    return read_redux(root, device=device, dtype=default_dtype(device) if dtype is None else dtype)


@dataclass(frozen=True)
class TextInputs:
    """A checked request's text side: how many prompts, and what `condition` adds to their encoding."""
    count: int  # P: prompts, prompt_embeds rows, or groups of Redux images
    prompt_embeds: Tensor | None
    pooled_prompt_embeds: Tensor | None
    redux: Redux | None
    redux_images: list[list[Image.Image]] | None  # P groups of K images, or one group shared by every prompt
    prompt_embeds_scale: list[float]  # one per prompt
    pooled_prompt_embeds_scale: list[float]

    @property
    def redux_tokens(self) -> int:
        """K × N, the tokens Redux appends to each prompt's T5 tokens."""
        if self.redux is None:
            return 0
        return len(self.redux_images[0]) * self.redux.image_encoder.config.num_patches

    def condition(self, txt: Tensor, vec: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(P, T, W), (P, V), (P, T) or None -> the same with each prompt's Redux tokens appended, scaled."""
        if self.redux is not None:
            # Each distinct image is encoded once: one shared group is encoded once for all P prompts.
            groups = self.redux_images
            tokens = self.redux([image for group in groups for image in group])  # (len(groups) · K, N, W)
            tokens = rearrange(tokens, "(G K) N W -> G (K N) W", G=len(groups)).to(txt)
            txt = torch.cat([txt, tokens.expand(txt.shape[0], -1, -1)], dim=1)  # text first, then the images
            if mask is not None:  # the image tokens are real tokens: attended
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], tokens.shape[1])], dim=1)
        scale = torch.tensor(self.prompt_embeds_scale, dtype=txt.dtype, device=txt.device)
        pooled_scale = torch.tensor(self.pooled_prompt_embeds_scale, dtype=vec.dtype, device=vec.device)
        return txt * scale[:, None, None], vec * pooled_scale[:, None], mask


def check_text_inputs(prompt, *, prompt_embeds, pooled_prompt_embeds, redux_image, redux, prompt_embeds_scale,
                      pooled_prompt_embeds_scale, t5_attention_mask, params: FluxParams) -> tuple[list | None, TextInputs]:
    """The caller's text arguments -> (the prompts as a list, or None without a prompt; the checked TextInputs).

    Checks shapes, not values: the prompts themselves are checked by `check_request`.
    """
    if prompt is not None and not isinstance(prompt, (str, list, tuple)):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else prompt
    if prompts is not None and prompt_embeds is not None:
        raise ValueError("give prompt or prompt_embeds (with pooled_prompt_embeds), not both")
    if (prompt_embeds is None) != (pooled_prompt_embeds is None):
        raise ValueError("prompt_embeds and pooled_prompt_embeds go together: T5's states (B, T, "
                         f"{params.context_in_dim}) and CLIP's pooled vector (B, {params.vec_in_dim}), e.g. from "
                         "pipe.encode_prompt(prompt)")
    if prompts is None and prompt_embeds is None and redux_image is None:
        raise ValueError("prompt must be a string or a non-empty list of strings (or give prompt_embeds and "
                         "pooled_prompt_embeds, or redux_image with redux=)")
    if prompt_embeds is not None:
        _check_embeds(prompt_embeds, pooled_prompt_embeds, params)
        if t5_attention_mask:
            raise ValueError("t5_attention_mask needs the prompt (it masks T5's padding tokens); with prompt_embeds "
                             "there is no tokenization to take the padding from")
    count = len(prompts) if isinstance(prompts, list) and prompts else None  # others: check_request says why
    count = prompt_embeds.shape[0] if prompt_embeds is not None else count
    groups = _check_redux(redux_image, redux, params)
    if groups is not None and len(groups) > 1:
        if count is not None and len(groups) != count:
            raise ValueError(f"redux_image: got {len(groups)} lists of images for {count} prompt(s); give one list "
                             "per prompt, or one image or list of images for all of them")
        count = len(groups)
    count = 1 if count is None else count
    scales = [_check_scale(name, value, count) for name, value in (("prompt_embeds_scale", prompt_embeds_scale),
                                                                  ("pooled_prompt_embeds_scale", pooled_prompt_embeds_scale))]
    return prompts, TextInputs(count=count, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                               redux=redux, redux_images=groups, prompt_embeds_scale=scales[0],
                               pooled_prompt_embeds_scale=scales[1])


def _check_embeds(prompt_embeds, pooled_prompt_embeds, params: FluxParams) -> None:
    for name, value, shape in (("prompt_embeds", prompt_embeds, f"(B, T, {params.context_in_dim})"),
                               ("pooled_prompt_embeds", pooled_prompt_embeds, f"(B, {params.vec_in_dim})")):
        if not (isinstance(value, Tensor) and value.is_floating_point()):
            raise ValueError(f"{name} must be a floating-point tensor {shape}, got {type(value).__name__}")
    if not (prompt_embeds.ndim == 3 and prompt_embeds.shape[0] > 0 and prompt_embeds.shape[1] > 0
            and prompt_embeds.shape[2] == params.context_in_dim):
        raise ValueError(f"prompt_embeds must be (B, T, {params.context_in_dim}) (T5's states; this transformer's text "
                         f"width is {params.context_in_dim}), got {tuple(prompt_embeds.shape)}")
    if not (pooled_prompt_embeds.ndim == 2 and pooled_prompt_embeds.shape[1] == params.vec_in_dim):
        raise ValueError(f"pooled_prompt_embeds must be (B, {params.vec_in_dim}) (CLIP's pooled vector), got "
                         f"{tuple(pooled_prompt_embeds.shape)}")
    if pooled_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
        raise ValueError(f"prompt_embeds has {prompt_embeds.shape[0]} rows and pooled_prompt_embeds "
                         f"{pooled_prompt_embeds.shape[0]}; give one of each per prompt")
    for name, value in (("prompt_embeds", prompt_embeds), ("pooled_prompt_embeds", pooled_prompt_embeds)):
        if not torch.isfinite(value).all():  # once per request, before the loop; NaN would only show as black images
            raise ValueError(f"{name} holds NaN or infinite values")


def _check_redux(redux_image, redux, params: FluxParams) -> list[list[Image.Image]] | None:
    """`redux_image` as groups: [[images]] shared by every prompt, or one list per prompt (all of one length)."""
    if redux_image is None:
        if redux is not None:
            raise ValueError("redux= is given without redux_image=: pass the image(s) to condition on")
        return None
    if not isinstance(redux, Redux):
        raise ValueError(f"redux_image needs redux=, a Redux model from flux.load_redux(...), got {type(redux).__name__}")
    if redux.token_width != params.context_in_dim:
        raise ValueError(f"redux: its tokens are {redux.token_width} wide, but this transformer's text width "
                         f"(context_in_dim) is {params.context_in_dim}; the Redux model belongs to another FLUX")
    if isinstance(redux_image, Image.Image):
        groups = [[redux_image]]
    elif isinstance(redux_image, (list, tuple)) and redux_image and all(isinstance(i, Image.Image) for i in redux_image):
        groups = [list(redux_image)]
    elif (isinstance(redux_image, (list, tuple)) and redux_image
          and all(isinstance(g, (list, tuple)) and g and all(isinstance(i, Image.Image) for i in g) for g in redux_image)):
        groups = [list(group) for group in redux_image]
        if len({len(group) for group in groups}) > 1:
            raise ValueError(f"redux_image: every prompt needs the same number of images (their tokens are batched), "
                             f"got {[len(group) for group in groups]}")
    else:
        raise ValueError("redux_image must be a PIL image, a list of PIL images (all used for every prompt), or one "
                         f"non-empty list of PIL images per prompt; got {type(redux_image).__name__}")
    return groups


def _check_scale(name: str, value, count: int) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count or not all(is_number(v) for v in values):
        raise ValueError(f"{name} must be a finite number or a list of {count} (one per prompt), got {value!r:.80}")
    return [float(v) for v in values]
