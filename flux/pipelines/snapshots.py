"""Finding a model's files: a local folder, a Hugging Face repo id in the cache, or the built-in model; and the
sampling defaults a repository states (scheduler settings, our own `flux_defaults.json`).
"""

import logging
import os
from dataclasses import replace
from pathlib import Path

from flux.modules.configs import SamplingDefaults, configs
from flux.pipelines.requests import MAX_SEQUENCE_LENGTH, MAX_STEPS, is_number
from flux.weights.checkpoint import CheckpointError, read_json_object
from flux.weights.layouts import WEIGHTS_HELP

log = logging.getLogger("flux")



def sampling_defaults(root: Path, *, guidance_embed: bool, preset: str | None = None) -> SamplingDefaults:
    """schnell's or dev's defaults (or those of `preset`, a family member's), from the loaded model and the
    repository's scheduler settings."""
    defaults = configs[preset or ("flux-dev" if guidance_embed else "flux-schnell")].sampling
    scheduler = root / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        settings = read_json_object(scheduler)
        defaults = replace(defaults, shift_schedule=settings.get("use_dynamic_shifting", defaults.shift_schedule),
                           base_shift=settings.get("base_shift", defaults.base_shift),
                           max_shift=settings.get("max_shift", defaults.max_shift))
        _check_defaults(scheduler, defaults)
    flux_settings = root / "flux_defaults.json"  # our own models state their sampling defaults here
    if flux_settings.is_file():
        try:
            defaults = replace(defaults, **read_json_object(flux_settings))
        except TypeError as error:  # a field SamplingDefaults does not have
            raise CheckpointError(f"{flux_settings}: not a valid defaults file: {error}") from None
        _check_defaults(flux_settings, defaults)
    return defaults


# What a defaults file may say, field by field. The shifts are logarithms (the schedule scales times by e^mu),
# FLUX's 0.5 and 1.15; the bound keeps out values (1e300, NaN) that break the schedule's exponential.
DEFAULTS_RANGES = {
    "num_steps": (lambda v: type(v) is int and 1 <= v <= MAX_STEPS, f"an integer in [1, {MAX_STEPS}]"),
    "guidance": (lambda v: v is None or is_number(v), "a finite number, or null for a model without guidance"),
    "shift_schedule": (lambda v: type(v) is bool, "true or false"),
    "max_sequence_length": (lambda v: type(v) is int and 1 < v <= MAX_SEQUENCE_LENGTH,
                            f"an integer in [2, {MAX_SEQUENCE_LENGTH}]"),
    "base_shift": (lambda v: is_number(v) and abs(v) <= 10, "a number in [-10, 10]"),
    "max_shift": (lambda v: is_number(v) and abs(v) <= 10, "a number in [-10, 10]"),
    "image_size": (lambda v: type(v) is int and 0 < v <= 16384 and v % 16 == 0, "a positive multiple of 16, at most 16384"),
}


def _check_defaults(path: Path, defaults: SamplingDefaults) -> None:
    for name, (valid, expected) in DEFAULTS_RANGES.items():
        value = getattr(defaults, name)
        if not valid(value):
            raise CheckpointError(f"{path}: {name} = {value!r:.80} is not a valid sampling default (expected {expected})")


def resolve_snapshot(path, *, patterns=None) -> Path:
    """A local folder as it is, or a repo id ("black-forest-labs/FLUX.1-schnell") from the Hugging Face cache.

    The cache lays a repository out as `models--{org}--{name}/snapshots/{revision}/`, with `refs/main`
    naming the revision; we read it without any network. Only when the files are not there and
    `huggingface_hub` is installed do we download, and then only the files we load: a FLUX.1 model's, or
    `patterns` for another kind of repository (FLUX.1 Redux).
    """
    local = Path(path).expanduser()
    if local.exists():
        return local
    repo_id = str(path)
    # "weights/FLUX.1-schnell" has a repo id's shape too: a first part that is a local folder marks a path.
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")) or local.parent.is_dir():
        raise CheckpointError(f"{path}: not found: no such folder, and not a repo id like 'black-forest-labs/FLUX.1-schnell' ({WEIGHTS_HELP})")
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub").expanduser()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: not in the Hugging Face cache ({repo}); download it first ({WEIGHTS_HELP}), "
            "or install huggingface_hub to let flux fetch it"
        ) from None
    if patterns is not None:
        log.warning("%s: not in the Hugging Face cache; downloading what flux loads into %s", repo_id, cache)
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns), cache_dir=cache))
    # The official repositories hold the transformer and autoencoder twice (single files and diffusers folders):
    # fetch the single files and the rest, and the folders only for a repository that has no single files.
    patterns = ["flux1-*.safetensors", "ae.safetensors", "model_index.json", "scheduler/*", "text_encoder/*",
                "text_encoder_2/*", "tokenizer/*", "tokenizer_2/*"]
    log.warning("%s: not in the Hugging Face cache; downloading what flux loads into %s", repo_id, cache)
    snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache))
    if not list(snapshot.glob("flux1-*.safetensors")) or not (snapshot / "ae.safetensors").is_file():
        snapshot = Path(snapshot_download(repo_id, allow_patterns=[*patterns, "transformer/*", "vae/*"], cache_dir=cache))
    return snapshot


BUILTIN = Path(__file__).resolve().parents[2] / "weights" / "flux-tiny"  # the repository's weights/, beside flux/


def builtin_model() -> Path:
    if not (BUILTIN / "model_index.json").is_file():
        raise CheckpointError(f"{BUILTIN}: the built-in model is missing; pass model= a FLUX.1 folder or repo id ({WEIGHTS_HELP})")
    log.warning("using the small built-in model (%s); pass model= for FLUX.1", BUILTIN)
    return BUILTIN
