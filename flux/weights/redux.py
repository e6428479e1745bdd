"""Reading FLUX.1 Redux: the embedder, the SigLIP image encoder and its image preprocessing, into `Redux`.

A FLUX.1-Redux-dev snapshot (manifests/README.md, redux.json and siglip-so400m.json) holds:

    flux1-redux-dev.safetensors                 the Redux embedder, Black Forest Labs' file (redux_up, redux_down)
    image_embedder/config.json + diffusion_pytorch_model.safetensors     the same tensors, diffusers' copy
    image_encoder/config.json + model.safetensors                        SigLIP so400m-patch14-384's vision tower
    feature_extractor/preprocessor_config.json                           how images become pixel values

Either copy of the embedder will do; the encoder and the preprocessing settings are needed in any case.
`read_redux` takes that folder (or the BFL file, with the folders beside it); `flux.load_redux` also finds a
repo id in the Hugging Face cache (flux/pipelines/redux.py).

`ImagePreprocessing` is transformers' `SiglipImageProcessor` as the official pipelines ran it (transformers 4's
Pillow implementation, `SiglipImageProcessorPil` in transformers 5): RGB, with transparency composited onto
white; Pillow's bicubic resize of the 8-bit image to 384×384, ignoring the aspect ratio; × 1/255 in float64,
then float32; (x − 0.5) / 0.5. tests/test_siglip.py checks it bit for bit.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flux.modules.redux import Redux, ReduxEmbedderConfig, ReduxImageEmbedder
from flux.modules.siglip import SiglipVisionConfig, SiglipVisionModel
from flux.weights.checkpoint import CheckpointError, load_into, read_json_object, read_safetensors, read_weights
from flux.weights.layouts import WEIGHTS_HELP, check_layer_count, read_model_config
from flux.weights.loading import shapes_only

EMBEDDER_FILE = "flux1-redux-dev.safetensors"
# Where each part lives in a snapshot; `flux.load_redux` downloads these when a repo id is not in the cache.
REDUX_FILES = (EMBEDDER_FILE, "model_index.json", "image_embedder/*", "image_encoder/*", "feature_extractor/*")


def read_redux(path, *, device="cpu", dtype=torch.bfloat16) -> Redux:
    """Redux from a FLUX.1-Redux-dev folder, or from its `flux1-redux-dev.safetensors` with the folders beside it.

    Every part is checked against the others before any weight is read: the embedder must take SigLIP's width.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found; pass a FLUX.1-Redux-dev folder ({WEIGHTS_HELP})")
    root = path.parent if path.is_file() else path
    embedder_state, embedder_source = _read_embedder(path)
    embedder_config = infer_redux_config(embedder_state, source=embedder_source)
    encoder_folder = _part(root, "image_encoder", "the SigLIP image encoder (config.json and model.safetensors)")
    encoder_config = read_siglip_config(encoder_folder)
    if encoder_config.hidden_size != embedder_config.redux_dim:
        raise CheckpointError(f"{embedder_source}: the Redux embedder takes {embedder_config.redux_dim}-wide states, but "
                              f"{encoder_folder / 'config.json'} gives SigLIP hidden_size {encoder_config.hidden_size}; "
                              "the two do not belong together")
    preprocessing = ImagePreprocessing.from_folder(
        _part(root, "feature_extractor", "the image preprocessing settings (preprocessor_config.json)"))
    if preprocessing.size != (encoder_config.image_size, encoder_config.image_size) and preprocessing.do_resize:
        raise CheckpointError(f"{root / 'feature_extractor'}: resizes images to {preprocessing.size[1]}×"
                              f"{preprocessing.size[0]}, but the encoder takes {encoder_config.image_size}² pixels")

    with shapes_only():
        encoder, embedder = SiglipVisionModel(encoder_config), ReduxImageEmbedder(embedder_config)
    encoder_state = siglip_official_names(read_weights(encoder_folder, "model"), source=encoder_folder)
    check_layer_count(encoder_state, "encoder.layers", encoder_config.num_hidden_layers, source=encoder_folder)
    load_into(encoder, encoder_state, source=encoder_folder, device=device, dtype=dtype)
    load_into(embedder, embedder_state, source=embedder_source, device=device, dtype=dtype)
    return Redux(encoder, embedder, preprocessing).eval().requires_grad_(False)


def _read_embedder(path: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The embedder's tensors and their file: the given file, BFL's file in the folder, or diffusers' copy."""
    if path.is_file():
        return read_safetensors(path), path
    if (path / EMBEDDER_FILE).is_file():
        return read_safetensors(path / EMBEDDER_FILE), path / EMBEDDER_FILE
    folder = path / "image_embedder"
    if folder.is_dir():
        return read_weights(folder, "diffusion_pytorch_model"), folder
    raise CheckpointError(f"{path}: no Redux embedder here: expected {EMBEDDER_FILE} or an image_embedder/ folder "
                          f"with diffusion_pytorch_model.safetensors ({WEIGHTS_HELP})")


def _part(root: Path, name: str, what: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise CheckpointError(f"{root}: no {name}/ folder; FLUX.1 Redux needs {what} from the FLUX.1-Redux-dev "
                              f"repository ({WEIGHTS_HELP})")
    return folder


def infer_redux_config(state_dict: dict[str, torch.Tensor], *, source: Path) -> ReduxEmbedderConfig:
    """The embedder's widths, read off `redux_up.weight` (3T, C) and checked against `redux_down.weight` (T, 3T)."""
    for name in ("redux_up.weight", "redux_down.weight"):
        if name not in state_dict or state_dict[name].ndim != 2:
            raise CheckpointError(f"{source}: not a Redux embedder (no 2-D {name!r} tensor)")
    hidden, redux_dim = state_dict["redux_up.weight"].shape
    width = state_dict["redux_down.weight"].shape[0]
    if state_dict["redux_down.weight"].shape[1] != hidden or hidden != 3 * width:
        raise CheckpointError(f"{source}: redux_up.weight {tuple(state_dict['redux_up.weight'].shape)} and redux_down.weight "
                              f"{tuple(state_dict['redux_down.weight'].shape)} do not make a (C -> 3T -> T) MLP")
    return ReduxEmbedderConfig(redux_dim=redux_dim, txt_in_features=width)


def read_siglip_config(folder: Path) -> SiglipVisionConfig:
    """The SiglipVisionConfig of a transformers `config.json` (a vision tower; tanh-GELU, as SigLIP was trained)."""
    path, config = read_model_config(folder)
    if "vision_config" in config:  # a whole SigLIP (text and vision towers): Redux's repository ships the vision one
        raise CheckpointError(f"{path}: a full SigLIP model (model_type {config.get('model_type')!r}); FLUX.1 Redux's "
                              "image_encoder/ is its vision tower alone (SiglipVisionModel)")
    if config.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise CheckpointError(f"{path}: hidden_act is {config['hidden_act']!r}; SigLIP's vision tower uses 'gelu_pytorch_tanh'")
    values = dict(num_channels=3, layer_norm_eps=1e-6, use_head=config.get("vision_use_head", True))
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                  "patch_size", "num_channels", "layer_norm_eps"):
        if field in config:
            values[field] = float(config[field]) if field == "layer_norm_eps" and type(config[field]) is int else config[field]
        elif field not in values:
            raise CheckpointError(f"{path}: the field {field!r} is missing")
    try:
        return SiglipVisionConfig(**values)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from None


def siglip_official_names(state_dict: dict[str, torch.Tensor], *, source: Path) -> dict[str, torch.Tensor]:
    """SigLIP tensors under the names our module spells: transformers 4 (the official file) wrote them under
    `vision_model.`, transformers 5 without. A stored `position_ids` buffer (0..728) is dropped."""
    prefixed = [name.startswith("vision_model.") for name in state_dict]
    if any(prefixed) and not all(prefixed):
        odd = [name for name, has in zip(state_dict, prefixed) if not has]
        raise CheckpointError(f"{source}: some tensor names start with 'vision_model.' and some do not "
                              f"(e.g. {odd[:3]}); the file mixes two layouts")
    cut = len("vision_model.") if all(prefixed) and prefixed else 0
    return {name[cut:]: tensor for name, tensor in state_dict.items() if not name.endswith("embeddings.position_ids")}


# --------------------------------------------------------------------------------------------------
# Images to pixel values
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImagePreprocessing:
    """`feature_extractor/preprocessor_config.json`: PIL image(s) -> (B, 3, height, width) fp32 pixel values."""
    size: tuple[int, int] = (384, 384)  # (height, width)
    resample: int = Image.Resampling.BICUBIC  # Pillow's number for it, 3, as the file states it
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_folder(cls, folder: Path) -> "ImagePreprocessing":
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            raise CheckpointError(f"{folder}: no preprocessor_config.json here ({WEIGHTS_HELP})")
        config = read_json_object(path)
        size = config.get("size", {"height": 384, "width": 384})
        checks = {
            "size": (isinstance(size, dict) and all(type(size.get(k)) is int and size[k] > 0 for k in ("height", "width")),
                     'an object {"height": ..., "width": ...} of positive integers'),
            "resample": (config.get("resample", 3) in {int(r) for r in Image.Resampling}, "one of Pillow's filters, 0 to 5"),
            "rescale_factor": (_is_positive(config.get("rescale_factor", 1 / 255)), "a positive number"),
            "image_mean": (_is_triple(config.get("image_mean", [0.5] * 3)), "three numbers"),
            "image_std": (_is_triple(config.get("image_std", [0.5] * 3), positive=True), "three positive numbers"),
            **{flag: (type(config.get(flag, True)) is bool, "true or false")
               for flag in ("do_resize", "do_rescale", "do_normalize")},
        }
        for name, (valid, expected) in checks.items():
            if not valid:
                raise CheckpointError(f"{path}: {name} = {config.get(name)!r:.80} is not valid (expected {expected})")
        return cls(size=(size["height"], size["width"]), resample=config.get("resample", 3),
                   do_resize=config.get("do_resize", True), do_rescale=config.get("do_rescale", True),
                   rescale_factor=float(config.get("rescale_factor", 1 / 255)), do_normalize=config.get("do_normalize", True),
                   image_mean=tuple(map(float, config.get("image_mean", [0.5] * 3))),
                   image_std=tuple(map(float, config.get("image_std", [0.5] * 3))))

    def __call__(self, images) -> torch.Tensor:
        """PIL image or list of them (any size, any mode) -> (B, 3, height, width) fp32 on the CPU."""
        images = [images] if isinstance(images, Image.Image) else images
        if not isinstance(images, (list, tuple)) or not images or not all(isinstance(i, Image.Image) for i in images):
            raise ValueError(f"Redux takes a PIL image or a non-empty list of PIL images, got {_describe(images)}")
        arrays = []
        for image in images:
            image = _to_rgb(image)
            if self.do_resize:  # Pillow takes (width, height)
                image = image.resize(self.size[::-1], resample=Image.Resampling(self.resample))
            arrays.append(np.asarray(image))  # (H, W, 3) uint8
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(f"images of different sizes {sorted({a.shape[:2] for a in arrays})} cannot be batched "
                             "when the preprocessing does not resize them")
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        if self.do_rescale:  # in float64 first, as transformers does: x · (1/255) then rounded once to float32
            pixels = pixels.double() * self.rescale_factor
        pixels = pixels.float()
        if self.do_normalize:
            mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (self.image_mean, self.image_std))
            pixels = (pixels - mean) / std
        return pixels.contiguous()


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency (an alpha band, or a palette's transparent colour) composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _is_positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def _is_triple(value, *, positive=False) -> bool:
    return (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                 and abs(v) < float("inf") for v in value)
            and (not positive or all(v > 0 for v in value)))


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r:.60}" if not isinstance(value, (list, tuple)) else \
        f"a {type(value).__name__} of {[type(v).__name__ for v in value][:4]}"
