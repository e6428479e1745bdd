"""LoRA for the FLUX transformer: training new adapters, and reading and writing the files in circulation.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") leaves a layer's weight W
frozen and learns a low-rank update beside it: y = W x + b + (alpha / rank) · strength · B A dropout(x),
with A (rank, in) and B (out, rank). It acts on a built model from outside: every update lives in a child
module `lora` of the `nn.Linear` it changes, and a forward hook on that Linear adds it to the output. The
Linear's own weight is never written, so removing the LoRA gives back the model bit for bit, and the
official tensor names (`double_blocks.0.img_attn.qkv.weight`) stay where they were.

Our fused projections (q, k, v in `img_attn.qkv`; q, k, v and the MLP input in `single_blocks.N.linear1`)
are separate layers in diffusers, so one Linear may carry several updates, each covering a slice of its
output rows. Files in five key layouts load (see docs/lora.md); `save_lora` writes three of them.
Black Forest Labs' control LoRAs also put a bias on B, widen img_in and replace the attention norms' scales
(flux/weights/control_lora.py); after `unload_lora` the model is again as loaded.

Axes: R rank, I a layer's input features, O the output rows an update covers.
"""

import fnmatch
import itertools
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from flux.weights import control_lora
from flux.weights.checkpoint import CheckpointError, read_safetensors
from flux.weights.layouts import diffusers_name_table
from flux.modules.transformer import Flux

# The attention and MLP projections of every block. The modulation layers (`img_mod.lin`, ...), whose
# outputs scale and gate whole residual streams, and the embedders are left out; name them to train them.
DEFAULT_TARGETS = (
    "double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj", "double_blocks.*.img_mlp.0", "double_blocks.*.img_mlp.2",
    "double_blocks.*.txt_attn.qkv", "double_blocks.*.txt_attn.proj", "double_blocks.*.txt_mlp.0", "double_blocks.*.txt_mlp.2",
    "single_blocks.*.linear1", "single_blocks.*.linear2",
)
# What a key ends with -> which tensor of the pair it is. Checked in this order (`.lora_down.weight` before
# XLabs' bare `.down.weight`).
KEY_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B",  # PEFT / diffusers, Black Forest Labs
    ".lora_B.bias": "bias",  # B's bias (PEFT's lora_bias): Black Forest Labs' control LoRAs
    ".lora_down.weight": "A", ".lora_up.weight": "B",  # kohya sd-scripts, OneTrainer, ComfyUI
    ".down.weight": "A", ".up.weight": "B",  # XLabs
    ".alpha": "alpha",
}
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.")
# diffusers stores the final layer's modulation as (scale, shift), the official model as (shift, scale):
# B's row halves swap between the two namings, as in flux.weights.loading.from_diffusers.
SWAPPED_HALVES = {"final_layer.adaLN_modulation.1"}


# --------------------------------------------------------------------------------------------------
# The public functions
# --------------------------------------------------------------------------------------------------

def add_lora(model: nn.Module, *, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS,
             dropout: float = 0.0) -> list[nn.Parameter]:
    """A new trainable LoRA on every `nn.Linear` whose name matches one of `targets`; returns its parameters.

    `targets` are glob patterns over the official module names (`"double_blocks.*.img_attn.qkv"`,
    `"final_layer.linear"`); each must match at least one Linear. `alpha` defaults to `rank` (scale 1).
    A starts as PEFT and nn.Linear initialise weights (Kaiming-uniform, a = √5) and B at zero, so the model's
    output is unchanged until the first step. The parameters are fp32, so small updates to a bf16 model are
    not rounded away. Nothing else is frozen here: call `model.requires_grad_(False)` first if the model
    was not loaded frozen (`load_flow_model`'s are), and hand the returned list to the optimiser.
    """
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if isinstance(targets, str):
        targets = (targets,)
    linears = _linears(model)
    chosen = {}
    for pattern in targets:
        matches = [name for name in linears if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise ValueError(f"LoRA target {pattern!r} matches no nn.Linear of the model; its Linears are named "
                             f"like {list(linears)[:4]} (glob patterns, `*` for a block index)")
        chosen.update(dict.fromkeys(matches))
    parameters = []
    for name in chosen:
        linear = linears[name]
        A = torch.empty(rank, linear.in_features, device=linear.weight.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros(linear.out_features, rank, device=linear.weight.device)
        update = LoRA(A, B, start=0, scale=(rank if alpha is None else alpha) / rank, dropout=dropout)
        _attach(linear, update)
        parameters += [update.A, update.B]
    return parameters


def load_lora(model: Flux, path, *, strength: float = 1.0) -> list[str]:
    """Adds the LoRA in the safetensors file `path` to `model`, un-merged; returns the module names it changes.

    The key layout (diffusers/PEFT, kohya, Black Forest Labs, XLabs, OneTrainer) is recognised key by key;
    a key that fits none of them, or a tensor that does not fit its layer, is a `CheckpointError` naming it,
    raised before the model is touched. Loaded updates are frozen; several LoRAs may be loaded at once.
    """
    path = Path(path)
    full, tensors = control_lora.split_full_tensors(model, read_safetensors(path), source=path)
    pairs = _pairs_from_file(model, tensors, _adapter_config(path), source=path)
    # Every check has passed: now the model changes (a control LoRA's wider img_in and norm scales first).
    wider = [pair.A.shape[1] for pair in pairs if pair.A.shape[1] > _linears(model)[pair.module].in_features]
    control_lora.apply(model, full=full, img_in_features=max(wider, default=None))
    linears = _linears(model)
    for pair in pairs:
        update = LoRA(pair.A, pair.B, start=pair.start, scale=pair.scale, strength=strength, bias=pair.bias)
        _attach(linears[pair.module], update.requires_grad_(False))
    return sorted({pair.module for pair in pairs} | set(full))


def unload_lora(model: nn.Module) -> None:
    """Removes every LoRA (loaded or added) from `model`: its Linears, img_in and norms are exactly as before."""
    for linear in _linears(model).values():
        if isinstance(getattr(linear, "lora", None), LinearLoRA):
            linear.lora.hook.remove()
            del linear.lora
    control_lora.restore(model)


def save_lora(model: Flux, path, *, format: str = "diffusers") -> None:
    """Writes the LoRA `model` carries to a safetensors file in diffusers', kohya's or Black Forest Labs' layout.

    Each layer's alpha is written beside its pair (`.alpha`), times the strength it was loaded with, so the
    file reproduces what the model computes now.
    """
    writers = {"diffusers": _diffusers_tensors, "kohya": _combined_tensors, "bfl": _combined_tensors}
    if format not in writers:
        raise ValueError(f"format must be one of {list(writers)}, got {format!r}")
    updates = {name: list(linear.lora.updates) for name, linear in _linears(model).items()
               if isinstance(getattr(linear, "lora", None), LinearLoRA)}
    if not updates:
        raise ValueError("the model carries no LoRA to save (add_lora or load_lora first)")
    if control_lora.carries_full_tensors(model) or any(u.bias is not None for us in updates.values() for u in us):
        raise ValueError("the model carries a control LoRA (biases on B, a widened img_in, replaced norm scales), "
                         "which save_lora does not write; keep the file it was loaded from")
    with torch.no_grad():
        tensors = writers[format](model, updates, format)
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, str(path),
              metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------------
# The modules: one update, and the updates of one Linear
# --------------------------------------------------------------------------------------------------

class LoRA(nn.Module):
    """One low-rank update to the output rows [start, start + O) of a Linear: scale · strength · (B A dropout(x) + bias).

    Held and computed in fp32 whatever the model's dtype, as PEFT does for trainable adapters. The bias (on B,
    PEFT's lora_bias) is scaled with the rest, as PEFT and Black Forest Labs' LinearLora scale it.
    """

    def __init__(self, A: Tensor, B: Tensor, *, start: int, scale: float, strength: float = 1.0, dropout: float = 0.0,
                 bias: Tensor | None = None):
        super().__init__()
        self.A = nn.Parameter(A.detach().to(torch.float32, copy=True))  # (R, I)
        self.B = nn.Parameter(B.detach().to(torch.float32, copy=True))  # (O, R)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32, copy=True))  # (O,)
        self.start, self.scale, self.strength = start, scale, strength
        self.dropout = nn.Dropout(dropout)

    @property
    def stop(self) -> int:
        return self.start + self.B.shape[0]

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, rows={self.start}:{self.stop}, scale={self.scale:g}, strength={self.strength:g}"

    def forward(self, x: Tensor) -> Tensor:
        """(..., I) -> (..., O) in fp32."""
        return self.scale * self.strength * F.linear(F.linear(self.dropout(x.float()), self.A), self.B, self.bias)


class LinearLoRA(nn.Module):
    """The LoRA updates of one nn.Linear, added to its output by a forward hook; the Linear is not modified."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.updates = nn.ModuleList()
        self.hook = linear.register_forward_hook(self.add_updates)

    def add_updates(self, linear: nn.Linear, inputs: tuple[Tensor], output: Tensor) -> Tensor:
        (x,) = inputs
        for update in self.updates:
            rows = output[..., update.start:update.stop] + update(x).to(output.dtype)
            output = output.slice_scatter(rows, dim=-1, start=update.start, end=update.stop)
        return output


def _attach(linear: nn.Linear, update: LoRA) -> None:
    if linear.weight.is_meta:
        raise ValueError("the model's weights are not loaded (still on the meta device); load them before adding a LoRA")
    if not isinstance(getattr(linear, "lora", None), LinearLoRA):
        linear.lora = LinearLoRA(linear)
    linear.lora.updates.append(update.to(linear.weight.device))


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


# --------------------------------------------------------------------------------------------------
# Reading: every key scheme, resolved to (our module, the rows it covers)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    module: str  # our (official) module name
    start: int  # the output rows the file's pair covers
    stop: int
    swap_halves: bool = False  # diffusers' final layer (SWAPPED_HALVES)


@dataclass(frozen=True)
class Pair:
    module: str
    start: int
    A: Tensor  # (R, I)
    B: Tensor  # (O, R)
    scale: float  # alpha / rank
    bias: Tensor | None = None  # (O,), on B


def _pairs_from_file(model: Flux, tensors: dict[str, Tensor], config: dict, *, source: Path) -> list[Pair]:
    """The (A, B, scale) pairs of a LoRA file, checked against `model`, under our module names."""
    stems = _key_stems(model)
    found, unknown = {}, []
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            raise CheckpointError(f"{source}: {key!r} belongs to a text-encoder LoRA; text-encoder LoRAs are not "
                                  "supported yet (only the transformer's). Remove those keys to load the rest")
        suffix = next((s for s in KEY_SUFFIXES if key.endswith(s)), None)
        stem = key[: -len(suffix)] if suffix else None
        if stem not in stems:
            unknown.append(key)
            continue
        found.setdefault(stem, {})[KEY_SUFFIXES[suffix]] = (key, tensor)
    if unknown:
        shown = ", ".join(map(repr, unknown[:8])) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise CheckpointError(f"{source}: {len(unknown)} key(s) that are no LoRA tensor of a layer this FLUX transformer "
                              f"has, in any known layout: {shown} (see docs/lora.md for the layouts)")
    if config.get("lora_alpha") is not None and any("alpha" in roles for roles in found.values()):
        raise CheckpointError(f"{source}: gives alpha twice, as `.alpha` tensors and as lora_alpha in its adapter config")

    linears, pairs = _linears(model), []
    for stem, roles in found.items():
        if "A" not in roles or "B" not in roles:
            key, _ = next(iter(roles.values()))
            raise CheckpointError(f"{source}: {key!r} has no partner: a LoRA layer needs both its down (A) and up (B) tensor")
        (a_key, A), (b_key, B) = roles["A"], roles["B"]
        target = stems[stem]
        linear = linears[target.module]
        rows = target.stop - target.start
        where = f"{target.module} (nn.Linear {linear.in_features} -> {linear.out_features}" + (
            f", rows {target.start}:{target.stop})" if rows != linear.out_features else ")")
        if A.ndim == 2 and A.shape[1] > linear.in_features:  # a control LoRA's wider img_in
            control_lora.check_widening(model, target.module, A.shape[1], key=a_key, source=source)
        elif A.ndim != 2 or A.shape[1] != linear.in_features:
            raise CheckpointError(f"{source}: {a_key!r} has shape {tuple(A.shape)}, but {where} needs (rank, {linear.in_features})")
        if tuple(B.shape) != (rows, A.shape[0]):
            raise CheckpointError(f"{source}: {b_key!r} has shape {tuple(B.shape)}, but {where} with rank "
                                  f"{A.shape[0]} (from {a_key!r}) needs ({rows}, {A.shape[0]})")
        bias = roles.get("bias", (None, None))[1]
        if bias is not None and tuple(bias.shape) != (rows,):
            raise CheckpointError(f"{source}: {roles['bias'][0]!r} has shape {tuple(bias.shape)}, but {where} needs ({rows},)")
        rank = A.shape[0]
        if rank == 0:
            raise CheckpointError(f"{source}: {a_key!r} has rank 0 (shape {tuple(A.shape)}): an empty LoRA layer; "
                                  "the file is broken, re-export it")
        if "alpha" in roles:
            alpha_key, alpha = roles["alpha"]
            if alpha.numel() != 1 or not math.isfinite(alpha.float().item()):
                raise CheckpointError(f"{source}: {alpha_key!r} must be one finite number, got a tensor of shape "
                                      f"{tuple(alpha.shape)}" + (f" holding {alpha.float().item()}" if alpha.numel() == 1 else ""))
            scale = alpha.float().item() / rank
        else:  # no alpha: the adapter config's, else alpha = rank (kohya's and diffusers' default)
            scale = _config_scale(config, stem, rank)
        B, bias = B.float(), None if bias is None else bias.float()
        if target.swap_halves:
            B = torch.cat(B.chunk(2)[::-1])
            bias = None if bias is None else torch.cat(bias.chunk(2)[::-1])
        pairs.append(Pair(target.module, target.start, A.float(), B, scale, bias))

    part_rows = _part_rows(model)
    split = [piece for pair in pairs for piece in _split_block_diagonal(pair, part_rows.get(pair.module))]
    return _coalesce(split)


def _key_stems(model: Flux) -> dict[str, Target]:
    """Every key stem (a key without its `.lora_A.weight`-like suffix) a LoRA for `model` may use."""
    linears, part_rows, hidden = _linears(model), _part_rows(model), model.params.hidden_size
    stems = {}
    for name, linear in linears.items():  # the official names: Black Forest Labs, ComfyUI, kohya
        whole = Target(name, 0, linear.out_features)
        stems[name] = stems[f"diffusion_model.{name}"] = stems["lora_unet_" + name.replace(".", "_")] = whole
    for theirs, (ours, part) in _diffusers_modules(model).items():  # diffusers/PEFT, OneTrainer
        if ours in linears:
            target = Target(ours, *part_rows[ours][part], swap_halves=ours in SWAPPED_HALVES)
            for stem in (theirs, f"transformer.{theirs}", "lora_transformer_" + theirs.replace(".", "_")):
                stems[stem] = target
    # XLabs (x-flux) keeps its LoRAs in attention processors: lora1 is the image stream, lora2 the text
    # stream; a single block's qkv_lora covers linear1's q, k, v rows but not its MLP rows.
    for prefix in ("", "diffusion_model."):
        for i in range(model.params.depth):
            for number, stream in (("1", "img"), ("2", "txt")):
                for layer in ("qkv", "proj"):
                    stems[f"{prefix}double_blocks.{i}.processor.{layer}_lora{number}"] = stems[f"double_blocks.{i}.{stream}_attn.{layer}"]
        for i in range(model.params.depth_single_blocks):
            stems[f"{prefix}single_blocks.{i}.processor.qkv_lora"] = Target(f"single_blocks.{i}.linear1", 0, 3 * hidden)
            stems[f"{prefix}single_blocks.{i}.processor.proj_lora"] = stems[f"single_blocks.{i}.linear2"]
    return stems


def _diffusers_modules(model: Flux) -> dict[str, tuple[str, int]]:
    """diffusers module name -> (our module, which part of it), from flux.weights.loading's tensor-name table."""
    table = diffusers_name_table(model.params.depth, model.params.depth_single_blocks)
    return {theirs.removesuffix(".weight"): (ours.removesuffix(".weight"), part)
            for ours, parts in table.items() if ours.endswith(".weight")
            for part, theirs in enumerate(parts)}


def _part_rows(model: Flux) -> dict[str, list[tuple[int, int]]]:
    """Our module -> the output rows of each of its diffusers layers: q, k, v (`hidden` rows each) and, for
    linear1, the MLP input after them; a single (0, out) for modules that are not fused."""
    table = diffusers_name_table(model.params.depth, model.params.depth_single_blocks)
    hidden, rows = model.params.hidden_size, {}
    for name, linear in _linears(model).items():
        parts = len(table.get(f"{name}.weight", [name]))
        sizes = [hidden] * (parts - 1) + [linear.out_features - hidden * (parts - 1)]
        rows[name] = list(itertools.pairwise(itertools.accumulate(sizes, initial=0)))
    return rows


def _split_block_diagonal(pair: Pair, part_rows: list[tuple[int, int]] | None) -> list[Pair]:
    """A pair over a whole fused projection whose B is block-diagonal (each part's rows read their own run of
    rank columns: how sd-scripts saves split q/k/v, and how save_lora writes several updates as one pair)
    as one pair per part; any other pair unchanged. Exact: the pieces' products are the rows of B·A."""
    if not part_rows or len(part_rows) == 1 or pair.start != 0 or pair.B.shape[0] != part_rows[-1][1] or pair.bias is not None:
        return [pair]
    pieces, next_column = [], 0
    for start, stop in part_rows:
        columns = pair.B[start:stop].ne(0).any(dim=0).nonzero().flatten().tolist()
        if not columns:
            continue  # an untouched part (a LoRA on q and v only)
        first, last = columns[0], columns[-1] + 1
        if first < next_column:
            return [pair]  # parts share rank columns: a dense update
        pieces.append(Pair(pair.module, start, pair.A[first:last], pair.B[start:stop, first:last], pair.scale))
        next_column = last
    return pieces if len(pieces) > 1 else [pair]


def _coalesce(pairs: list[Pair]) -> list[Pair]:
    """Neighbouring pairs on one module that share A and scale (and both have a bias or neither) as one pair.
    diffusers writes a fused update so (A copied to q, k and v); merging them back makes save -> load return
    what was saved."""
    merged = []
    for pair in sorted(pairs, key=lambda p: (p.module, p.start)):
        last = merged[-1] if merged else None
        if (last is not None and last.module == pair.module and last.start + last.B.shape[0] == pair.start
                and last.scale == pair.scale and last.A.shape == pair.A.shape and torch.equal(last.A, pair.A)
                and (last.bias is None) == (pair.bias is None)):
            bias = None if pair.bias is None else torch.cat([last.bias, pair.bias])
            merged[-1] = replace(last, B=torch.cat([last.B, pair.B]), bias=bias)
        else:
            merged.append(pair)
    return merged


def _adapter_config(path: Path) -> dict:
    """PEFT's LoraConfig, which diffusers' save_lora_weights/save_lora_adapter put in the file's metadata,
    with the fields we use checked: lora_alpha a number, alpha_pattern a map of regular expressions to numbers."""
    with safe_open(str(path), framework="pt") as file:
        raw = (file.metadata() or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as error:  # not JSON, nested too deep, a 5000-digit number
        raise CheckpointError(f"{path}: its lora_adapter_metadata is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: its lora_adapter_metadata must be a JSON object (PEFT's LoraConfig), "
                              f"got {type(config).__name__}")
    # A pipeline's file prefixes each component's fields ("transformer.lora_alpha"); a model's does not.
    config = {k.removeprefix("transformer."): v for k, v in config.items() if not k.startswith("text_encoder")}
    if config.get("use_dora"):
        raise CheckpointError(f"{path}: a DoRA adapter (use_dora in its config); only plain LoRA is supported")

    def check_alpha(value, field):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"{path}: lora_adapter_metadata's {field} must be a finite number, got {value!r:.80}")

    if not isinstance(config.get("use_rslora", False), bool):
        raise CheckpointError(f"{path}: lora_adapter_metadata's use_rslora must be true or false, got {config['use_rslora']!r:.80}")
    if config.get("lora_alpha") is not None:
        check_alpha(config["lora_alpha"], "lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{path}: lora_adapter_metadata's alpha_pattern must map module-name patterns to "
                              f"alphas, got {patterns!r:.80}")
    compiled = {}
    for pattern, alpha in patterns.items():
        check_alpha(alpha, f"alpha_pattern[{pattern!r:.80}]")
        try:  # PEFT's rule: the pattern matches the end of the module name, at a dot
            compiled[re.compile(rf"(.*\.)?({pattern})$")] = alpha
        except re.error as error:
            raise CheckpointError(f"{path}: lora_adapter_metadata's alpha_pattern key {pattern!r:.80} is not a "
                                  f"regular expression ({error})") from None
    return {**config, "alpha_pattern": compiled}


def _config_scale(config: dict, stem: str, rank: int) -> float:
    """alpha / rank from a checked PEFT config: alpha_pattern's first match, else lora_alpha, else rank;
    rsLoRA divides by √rank instead."""
    name = stem.removeprefix("transformer.")
    alpha = next((a for p, a in config.get("alpha_pattern", {}).items() if p.match(name)), None)
    alpha = alpha if alpha is not None else config.get("lora_alpha") if config.get("lora_alpha") is not None else rank
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def _diffusers_tensors(model: Flux, updates: dict[str, list[LoRA]], format: str) -> dict[str, Tensor]:
    """`transformer.<diffusers layer>.lora_A.weight / lora_B.weight / alpha`; a fused update becomes one pair
    per diffusers layer, A copied to each, B cut by rows (what diffusers itself does with kohya's files)."""
    names = {(ours, part): theirs for theirs, (ours, part) in _diffusers_modules(model).items()}
    part_rows, tensors = _part_rows(model), {}
    for module, module_updates in updates.items():
        for update in module_updates:
            parts = [k for k, (start, stop) in enumerate(part_rows[module]) if update.start <= start and stop <= update.stop]
            if sum(stop - start for start, stop in (part_rows[module][k] for k in parts)) != update.stop - update.start:
                raise ValueError(f"the update to rows {update.start}:{update.stop} of {module} does not cover whole "
                                 "diffusers layers; save it in the kohya or bfl format")
            for k in parts:
                start, stop = part_rows[module][k]
                B = update.B[start - update.start:stop - update.start]
                if module in SWAPPED_HALVES:
                    B = torch.cat(B.chunk(2)[::-1])
                stem = f"transformer.{names[module, k]}"
                if f"{stem}.lora_A.weight" in tensors:
                    raise ValueError(f"{module} carries several LoRAs on the same rows; diffusers' layout holds one "
                                     "per layer: save in the kohya or bfl format, which combine them")
                rank = update.A.shape[0]
                tensors |= {f"{stem}.lora_A.weight": update.A.clone(), f"{stem}.lora_B.weight": B.clone(),
                            f"{stem}.alpha": torch.tensor(update.scale * update.strength * rank)}
    return tensors


def _combined_tensors(model: Flux, updates: dict[str, list[LoRA]], format: str) -> dict[str, Tensor]:
    """One pair per official module: kohya's `lora_unet_<name with _>.lora_down/lora_up/alpha`, or Black
    Forest Labs' `<name>.lora_A/lora_B` (with an `.alpha` of ours). Several updates of one module become one
    pair of their summed ranks: A stacked, B block-diagonal (load_lora splits it again)."""
    linears, tensors = _linears(model), {}
    for module, module_updates in updates.items():
        scales = [update.scale * update.strength for update in module_updates]
        common = scales[0] if len(set(scales)) == 1 else 1.0  # else each part's own scale goes into its B
        A = torch.cat([update.A for update in module_updates])
        B = A.new_zeros(linears[module].out_features, A.shape[0])
        column = 0
        for update, scale in zip(module_updates, scales):
            rank = update.A.shape[0]
            B[update.start:update.stop, column:column + rank] = update.B if scale == common else update.B * (scale / common)
            column += rank
        stem, down, up = (("lora_unet_" + module.replace(".", "_"), "lora_down", "lora_up") if format == "kohya"
                          else (module, "lora_A", "lora_B"))
        tensors |= {f"{stem}.{down}.weight": A.clone(), f"{stem}.{up}.weight": B,
                    f"{stem}.alpha": torch.tensor(common * A.shape[0])}
    return tensors
