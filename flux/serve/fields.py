"""The OpenAI Images API's request fields, read and checked: JSON bodies for generations, multipart forms for
edits, and the OpenAI error shape every refusal takes.

Every user mistake becomes an `APIError` with status 400 (or 401, 404, 429) and `param` naming the field, before
the request reaches the queue. The checks on sizes, steps and the like are the pipeline's own
(flux.pipelines.requests), so the server, the `flux` command and `Pipeline` refuse the same values with the same
words. A 500 is left for the server's own failures: the OpenAI SDK retries a 5xx twice, re-running the work.

Fields beyond the OpenAI API (the SDK sends them through `extra_body`): seed, steps, guidance, negative_prompt,
true_cfg_scale, and for edits strength (image-to-image and Fill) and auto_resize (Kontext). Unknown fields are
refused, so that a misspelt `sed` does not go unseen.
"""

import io
import re
from dataclasses import dataclass

from PIL import Image

from flux.pipelines.requests import MAX_STEPS, check_request, image_seeds, is_int, is_number
from flux.pipelines.variants import reference_size

MAX_IMAGES = 10  # n, as the OpenAI API bounds it
OUTPUT_FORMATS = ("png", "jpeg", "webp")
# OpenAI fields that change nothing here (quality tiers and styles belong to other models); accepted and ignored.
IGNORED = {"quality", "style", "moderation", "user", "safety_identifier", "input_fidelity"}
COMMON = {"prompt", "model", "n", "size", "response_format", "output_format", "output_compression", "stream",
          "partial_images", "background", "seed", "steps", "guidance", "negative_prompt", "true_cfg_scale"} | IGNORED
GENERATION_FIELDS = COMMON
EDIT_FIELDS = COMMON | {"image", "image[]", "mask", "strength", "auto_resize"}


class APIError(Exception):
    """A refusal in the OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ImageRequest:
    """What a generation or edit asks for, checked; `seeds` holds one seed per image."""
    prompt: str
    seeds: list
    width: int
    height: int
    steps: int
    guidance: float | None
    negative_prompt: str | None
    true_cfg_scale: float
    output_format: str
    output_compression: int | None
    stream: bool
    partial_images: int | None
    strength: float | None = None  # None: not given (the model's own default applies)
    auto_resize: bool | None = None


def read_request(fields: dict, *, allowed: set, form: bool, model_id: str, default_size: tuple[int, int],
                 default_steps: int) -> ImageRequest:
    """A JSON object or a form's text fields -> ImageRequest, or APIError naming the first bad field.

    `form`: the values are strings (multipart sends every field as text), converted here; in JSON they must
    already have their type: "2" is not a number of images."""
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise invalid(unknown[0], f"unknown parameter {unknown[0]!r}; this server takes {', '.join(sorted(allowed - IGNORED))}",
                      code="unknown_parameter")
    read = _Reader(fields, form)
    prompt = fields.get("prompt")
    if prompt is None:
        raise invalid("prompt", "prompt is required", code="missing_required_parameter")
    if not isinstance(prompt, str):
        raise invalid("prompt", f"prompt must be a string, got {type(prompt).__name__}")
    _pipeline_check("prompt", [prompt])
    model = fields.get("model")
    if model is not None and model != model_id:
        raise APIError(404, f"the model {model!r:.80} is not served here; this server serves {model_id!r}",
                       param="model", code="model_not_found")
    count = read.integer("n", 1)
    if not 1 <= count <= MAX_IMAGES:
        raise invalid("n", f"n must be an integer from 1 to {MAX_IMAGES}, got {count}")
    width, height = read_size(fields.get("size"), default_size)
    response_format = fields.get("response_format") or "b64_json"
    if response_format == "url":
        raise invalid("response_format", "response_format 'url' is not supported: this server keeps no files; "
                      "use 'b64_json' (the default)", code="unsupported_value")
    if response_format != "b64_json":
        raise invalid("response_format", f"response_format must be 'b64_json', got {response_format!r:.80}")
    output_format = fields.get("output_format") or "png"
    if output_format not in OUTPUT_FORMATS:
        raise invalid("output_format", f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r:.80}")
    compression = read.integer("output_compression", None)
    if compression is not None and not (0 <= compression <= 100 and output_format != "png"):
        raise invalid("output_compression", "output_compression is a quality from 0 to 100, for jpeg and webp only")
    if fields.get("background") not in (None, "auto", "opaque"):
        raise invalid("background", "background must be 'auto' or 'opaque': FLUX.1 draws no transparency")
    steps = read.integer("steps", default_steps)
    _pipeline_check("steps", ["x"], num_steps=steps)
    seed = read.integer("seed", None)
    try:
        seeds = image_seeds(seed, count)
    except ValueError as error:
        raise invalid("seed", str(error)) from None
    guidance = read.number("guidance", None)
    negative = fields.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise invalid("negative_prompt", f"negative_prompt must be a string, got {type(negative).__name__}")
    true_cfg_scale = read.number("true_cfg_scale", 1.0)
    _pipeline_check("true_cfg_scale", ["x"], true_cfg_scale=true_cfg_scale, negative_prompt=negative)
    strength = read.number("strength", None)
    if strength is not None:
        _pipeline_check("strength", ["x"], strength=strength)
    auto_resize = read.boolean("auto_resize", None)
    stream = read.boolean("stream", False)
    partial_images = read.integer("partial_images", None)
    if partial_images is not None and not 0 <= partial_images <= MAX_STEPS:
        raise invalid("partial_images", f"partial_images must be an integer ≥ 0, got {partial_images}")
    return ImageRequest(prompt=prompt, seeds=seeds, width=width, height=height, steps=steps, guidance=guidance,
                        negative_prompt=negative, true_cfg_scale=true_cfg_scale, output_format=output_format,
                        output_compression=compression, stream=stream, partial_images=partial_images,
                        strength=strength, auto_resize=auto_resize)


SIZE = re.compile(r"(\d{1,6})x(\d{1,6})")


def read_size(size, default: tuple[int, int]) -> tuple[int, int]:
    """'WxH' (or 'auto', or absent: `default`) -> (width, height), each a positive multiple of 16."""
    if size is None or size == "auto":
        return default
    match = SIZE.fullmatch(size) if isinstance(size, str) else None
    if match is None:
        raise invalid("size", f"size must be 'WIDTHxHEIGHT' (e.g. '1024x768') or 'auto', got {size!r:.80}")
    width, height = int(match[1]), int(match[2])
    _pipeline_check("size", ["x"], width=width, height=height)
    return width, height


def _pipeline_check(param: str, prompts, **values) -> None:
    """flux.pipelines.requests.check_request on one field, its message under that field's name."""
    values = {"width": None, "height": None, "num_steps": None, **values}
    try:
        check_request(prompts, **values)
    except ValueError as error:
        raise invalid(param, str(error)) from None


class _Reader:
    """Typed field values from JSON (typed already) or from a form (text, converted)."""

    def __init__(self, fields: dict, form: bool):
        self.fields, self.form = fields, form

    def integer(self, name: str, default):
        value = self.fields.get(name)
        if value is None:
            return default
        if self.form and isinstance(value, str) and re.fullmatch(r"-?\d{1,25}", value.strip()):
            return int(value)
        if not self.form and is_int(value):
            return int(value)
        raise invalid(name, f"{name} must be an integer, got {value!r:.80}")

    def number(self, name: str, default):
        value = self.fields.get(name)
        if value is None:
            return default
        if self.form and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if not is_number(value):
            raise invalid(name, f"{name} must be a finite number, got {value!r:.80}")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.fields.get(name)
        if value is None:
            return default
        if self.form and value in ("true", "false"):
            return value == "true"
        if isinstance(value, bool):
            return value
        raise invalid(name, f"{name} must be true or false, got {value!r:.80}")


def read_image(data: bytes, param: str) -> Image.Image:
    """An uploaded file -> a loaded PIL image, or a 400 naming the field."""
    try:
        picture = Image.open(io.BytesIO(data))
        picture.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise invalid(param, f"{param}: not an image this server can read (PNG, JPEG, WebP, ...): {error}",
                      code="invalid_image") from None
    return picture


def edit_area(mask: Image.Image) -> Image.Image:
    """An OpenAI-style mask -> an 8-bit image, 255 where the model is to paint anew and 0 where it keeps the image.

    The OpenAI convention: a mask with transparency marks the area to edit by its fully transparent pixels; a
    mask without an alpha channel marks it in white (above mid-grey)."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda value: 255 if value == 0 else 0)
    return mask.convert("L").point(lambda value: 255 if value > 127 else 0)


def edit_size(picture: Image.Image, default: tuple[int, int], *, variant: str = "text-to-image",
              auto_resize: bool = True) -> tuple[int, int]:
    """The size an edit comes out at without `size`. A Kontext model's, as `Pipeline` chooses it: the first
    reference's size once resized (with `auto_resize`, the trained resolution of nearest aspect ratio). Otherwise
    the image's aspect ratio, no larger in area than the model's default size, each side a multiple of 16 (at
    least 16)."""
    width, height = picture.size
    if variant == "kontext" and auto_resize and min(width, height) >= 16:  # smaller: the pipeline refuses it
        return reference_size(picture, auto_resize=True)
    scale = min(1.0, (default[0] * default[1] / (width * height)) ** 0.5)
    return max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)
