"""The documentation against the code: README.md and docs/ run, and what they quote is what the code does.

- Every ```python block of README.md and docs/*.md runs: each file's blocks in order, in one namespace, in a
  temporary working directory. The tiny snapshot of conftest.py stands in for FLUX.1-schnell under the names
  the pages use: the repo id `black-forest-labs/FLUX.1-schnell` (through a temporary Hugging Face cache) and
  the folder `weights/FLUX.1-schnell` (where weights/README.md downloads to), with the fp8 file and the
  prefixed bundle docs/loading.md loads beside it; the tiny Redux of conftest.py stands in for FLUX.1-Redux-dev
  under the same two kinds of names. Its defaults are 128×128 pixels and 32 T5 tokens rather
  than FLUX.1's 1024×1024 and 256 (a `flux_defaults.json`, as our own small models have), so that examples
  which leave them out stay fast.
- Every `flux generate` line of a ```sh block runs through `flux.cli.main.main`, in the same directory.
- The parameter counts of docs/architecture.md are recomputed from full-size modules built on `meta`, and
  their totals compared with the manifests of the official files.
- Code references, a link to a flux/*.py file followed by backticked names
  (`[flux/modules/transformer.py](../flux/modules/transformer.py) `Flux.forward``), must name things that exist, and every public
  function and class of the package must be referenced from docs/. Relative links and anchors must resolve.
- The key tables and error messages of docs/loading.md and the options of the `flux` command in docs/api.md
  are the code's.
"""

import functools
import importlib
import inspect
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from snapshots import MANIFESTS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Pages other engineers own and test with their code: their examples do not run here, and links to them are
# checked once they exist.
ELSEWHERE = ("training.md", "lora.md")
OUR_PAGES = [page for page in sorted(DOCS.glob("*.md")) if page.name not in ELSEWHERE]
PAGES = [ROOT / "README.md", *OUR_PAGES]

# README.md shows FLUX.1 at its native size; the tiny stand-in takes minutes at 1024×768 on a CPU. Each of these
# exact substitutions must apply once, and shrinks README's examples for this test only.
README_SIZES = {"width=1024, height=768": "width=128, height=96"}
STAND_IN_DEFAULTS = {"image_size": 128, "max_sequence_length": 32}

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_LINK = r"\[[^\]]*\]\((?:\.\./)?flux/([\w/]+)\.py\)"
CODE_REFERENCE = re.compile(CODE_LINK + r"((?:\s*(?:,|;|and)?\s*`[^`\s]+`)+)")
LINK_TARGET = re.compile(r"\]\(([^)\s]+)\)")


def name_of(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def fenced_blocks(page: Path, language: str) -> list[tuple[int, str]]:
    """(line of the block's first code line, code) for each ```language block of a Markdown file."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def prose(page: Path) -> str:
    """The page without its fenced blocks (kept as blank lines), where links and references are read."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text(encoding="utf-8"))


def section(page: Path, heading: str) -> str:
    """The text from a `## heading` line to the next `## ` heading."""
    text = page.read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def command_lines(page: Path) -> list[str]:
    """The `flux generate` commands of a page's ```sh blocks, continuation lines joined."""
    commands = []
    for _, block in fenced_blocks(page, "sh"):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("flux generate"):
                commands.append(line)
    return commands


# --------------------------------------------------------------------------------------------------
# The examples run
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stand_in(tiny_snapshot, tiny_redux, tmp_path_factory):
    """A directory holding `hub/` (a Hugging Face cache) and `work/` (the examples' working directory)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("docs")
    snapshot = root / "FLUX.1-schnell"
    snapshot.mkdir()
    for entry in tiny_snapshot.iterdir():  # links, so that the session's snapshot is never written to
        (snapshot / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (snapshot / "flux_defaults.json").write_text(json.dumps(STAND_IN_DEFAULTS))

    repo = root / "hub" / "models--black-forest-labs--FLUX.1-schnell"  # the cache's own layout
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("stand-in\n")
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / "stand-in").symlink_to(snapshot, target_is_directory=True)
    redux = root / "hub" / "models--black-forest-labs--FLUX.1-Redux-dev"  # the tiny Redux, for docs/redux.md
    (redux / "refs").mkdir(parents=True)
    (redux / "refs" / "main").write_text("stand-in\n")
    (redux / "snapshots").mkdir()
    (redux / "snapshots" / "stand-in").symlink_to(tiny_redux[0], target_is_directory=True)

    weights = root / "work" / "weights"
    weights.mkdir(parents=True)
    (weights / "FLUX.1-schnell").symlink_to(snapshot, target_is_directory=True)
    (weights / "FLUX.1-Redux-dev").symlink_to(tiny_redux[0], target_is_directory=True)
    transformer, autoencoder = load_file(snapshot / "flux1-schnell.safetensors"), load_file(snapshot / "ae.safetensors")
    save_file({name: t.to(torch.float8_e4m3fn) for name, t in transformer.items()}, weights / "flux1-schnell-fp8.safetensors")
    save_file({**{f"model.diffusion_model.{name}": t for name, t in transformer.items()},
               **{f"vae.{name}": t for name, t in autoencoder.items()}}, weights / "flux1-schnell-comfyui.safetensors")
    return root


@pytest.fixture(scope="module")
def family_stand_in(stand_in, tiny_dev_snapshot, tiny_fill_snapshot, tiny_canny_snapshot, tiny_kontext_snapshot):
    """docs/family.md's repositories beside FLUX.1-schnell in weights/, with the stand-in's small defaults (and 2
    steps), and a control LoRA in Black Forest Labs' layout."""
    from snapshots import bfl_control_lora

    from flux import load_flow_model

    weights = stand_in / "work" / "weights"
    for name, source in {"FLUX.1-dev": tiny_dev_snapshot, "FLUX.1-Fill-dev": tiny_fill_snapshot,
                         "FLUX.1-Canny-dev": tiny_canny_snapshot, "FLUX.1-Kontext-dev": tiny_kontext_snapshot}.items():
        folder = stand_in / name
        folder.mkdir()
        for entry in source.iterdir():
            (folder / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
        # Their 50 and 28 steps, the family's defaults, would make the page's examples take minutes: 2 here.
        (folder / "flux_defaults.json").write_text(json.dumps({**STAND_IN_DEFAULTS, "num_steps": 2}))
        (weights / name).symlink_to(folder, target_is_directory=True)
    bfl_control_lora(load_flow_model(tiny_dev_snapshot, dtype=torch.float32), weights / "flux1-canny-dev-lora.safetensors")
    return stand_in


@pytest.fixture
def in_stand_in(stand_in, monkeypatch):
    import flux.pipelines.pipeline

    monkeypatch.chdir(stand_in / "work")
    monkeypatch.setenv("HF_HUB_CACHE", str(stand_in / "hub"))
    monkeypatch.setattr(flux.pipelines.pipeline, "_pipelines", {})  # flux.generate's pipelines, kept per model
    return stand_in / "work"


def shrink_readme(blocks: list[tuple[int, str]]) -> list[tuple[int, str]]:
    for old in README_SIZES:
        found = sum(code.count(old) for _, code in blocks)
        assert found == 1, f"README.md: expected {old!r} once in its examples (README_SIZES in {__file__}), found {found}"
    return [(line, functools.reduce(lambda code, change: code.replace(*change), README_SIZES.items(), code))
            for line, code in blocks]


@pytest.mark.parametrize("page", [p for p in PAGES if fenced_blocks(p, "python")], ids=name_of)
def test_python_examples_run(page, in_stand_in, request):
    if page.name == "family.md":
        request.getfixturevalue("family_stand_in")
    blocks = fenced_blocks(page, "python")
    if page == ROOT / "README.md":
        blocks = shrink_readme(blocks)
    namespace = {"__name__": "__docs__"}
    for line, code in blocks:
        # Padded so that a traceback points at the page's own line numbers.
        exec(compile("\n" * (line - 1) + code, str(page), "exec"), namespace)


@pytest.mark.parametrize("page", [p for p in PAGES if command_lines(p)], ids=name_of)
def test_flux_command_lines_run(page, in_stand_in, capsys, request):
    from flux.cli.main import main, parser

    if page.name == "family.md":
        request.getfixturevalue("family_stand_in")
    for command in command_lines(page):
        argv = shlex.split(command, comments=True)[1:]
        code = main(argv)
        assert code == 0, f"{name_of(page)}: `{command}` exited with {code}: {capsys.readouterr().err}"
        args = parser().parse_args(argv)
        output = Path(args.output)
        outputs = [output] if args.num_images == 1 else [output.with_name(f"{output.stem}_{i}{output.suffix}")
                                                         for i in range(args.num_images)]
        assert all(path.is_file() for path in outputs), f"`{command}` did not write {outputs}"


# --------------------------------------------------------------------------------------------------
# The numbers
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_size():
    """The names the parameter table's expressions use, built as its page says: full size, on `meta`."""
    from flux.modules.autoencoder import AutoEncoder, AutoEncoderParams
    from flux.modules.clip import CLIP_L, CLIPTextModel
    from flux.modules.configs import configs
    from flux.modules.redux import REDUX_DEV, ReduxImageEmbedder
    from flux.modules.siglip import SO400M_PATCH14_384, SiglipVisionModel
    from flux.modules.transformer import Flux, Modulation
    from flux.modules.t5 import T5_XXL, T5Encoder

    def count(*modules):
        return sum(p.numel() for module in modules for p in module.parameters())

    with torch.device("meta"):
        return dict(schnell=Flux(configs["flux-schnell"].params), dev=Flux(configs["flux-dev"].params),
                    t5=T5Encoder(T5_XXL), clip=CLIPTextModel(CLIP_L), ae=AutoEncoder(AutoEncoderParams()),
                    siglip=SiglipVisionModel(SO400M_PATCH14_384), redux_embedder=ReduxImageEmbedder(REDUX_DEV),
                    count=count, Modulation=Modulation)


def parameter_rows() -> list[tuple[str, str, int]]:
    """(component, expression, stated count) for each row of the parameter table."""
    rows = re.findall(r"^\| ([^|]+?) \| `([^`]+)` \| ([\d,]+) \|$", section(DOCS / "architecture.md", "Parameter counts"),
                      re.MULTILINE)
    return [(component, expression, int(stated.replace(",", ""))) for component, expression, stated in rows]


def test_parameter_counts_are_what_the_code_computes(full_size):
    rows = parameter_rows()
    assert len(rows) >= 10, f"docs/architecture.md: found only {len(rows)} rows in the parameter table"
    wrong = []
    for component, expression, stated in rows:
        computed = eval(expression, dict(full_size))
        if computed != stated:
            wrong.append(f"{component}: {expression} = {computed:,}, the page says {stated:,}")
    assert not wrong, "docs/architecture.md, parameter counts:\n" + "\n".join(wrong)


@pytest.mark.skipif(MANIFESTS is None, reason="the manifests of the official files are not on this machine")
def test_parameter_totals_are_the_official_files():
    stated = {expression: count for _, expression, count in parameter_rows()}
    for expression, manifest in {"count(schnell)": "flux1-schnell.json", "count(dev)": "flux1-dev.json",
                                 "count(t5)": "t5-xxl.json", "count(clip)": "clip-l.json", "count(ae)": "ae.json",
                                 "count(siglip)": "siglip-so400m.json", "count(redux_embedder)": "redux.json"}.items():
        official = json.loads((MANIFESTS / manifest).read_text())["parameters"]
        assert stated[expression] == official, f"{expression}: the page says {stated[expression]:,}, {manifest} {official:,}"


# --------------------------------------------------------------------------------------------------
# References and links
# --------------------------------------------------------------------------------------------------

def code_references(page: Path) -> list[tuple[str, str]]:
    """(module, dotted name) for every backticked name right after a link to a flux/*.py file."""
    return [(module, name) for module, names in CODE_REFERENCE.findall(prose(page))
            for name in re.findall(r"`([^`]+)`", names)]


def resolves(module: str, dotted: str) -> bool:
    target = importlib.import_module("flux." + module.replace("/", "."))
    for part in dotted.split("."):
        if not hasattr(target, part):
            return False
        target = getattr(target, part)
    return True


@pytest.mark.parametrize("page", PAGES, ids=name_of)
def test_code_references_name_what_exists(page):
    references = code_references(page)
    missing = [f"flux/{module}.py `{name}`" for module, name in references if not resolves(module, name)]
    assert not missing, f"{name_of(page)} names what the code does not have: {missing}"


DOCUMENTED_MODULES = ("weights/tokenizers", "modules/t5", "modules/clip", "pipelines/sampling", "modules/transformer",
                      "modules/autoencoder", "modules/configs", "weights/checkpoint", "weights/layouts",
                      "weights/loading", "pipelines/pipeline", "cli/main", "weights/fp8", "runtime/offload",
                      "runtime/compile", "weights/quantized", "pipelines/requests", "pipelines/devices",
                      "pipelines/snapshots", "modules/siglip", "modules/redux", "weights/redux", "pipelines/redux")


def test_every_public_function_and_class_is_referenced():
    referenced = {(module, name.split(".")[0]) for page in OUR_PAGES for module, name in code_references(page)}
    missing = []
    for module_name in DOCUMENTED_MODULES:
        module = importlib.import_module("flux." + module_name.replace("/", "."))
        for name, value in vars(module).items():
            public = not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
            if public and value.__module__ == module.__name__ and (module_name, name) not in referenced:
                missing.append(f"flux/{module_name}.py `{name}`")
    assert not missing, ("not referenced from docs/ (write it after a link to its file, e.g. in a `Code:` line): "
                         + ", ".join(missing))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", prose(page), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=name_of)
def test_links_resolve(page):
    broken = []
    for target in LINK_TARGET.findall(prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            if not (destination.parent == DOCS and destination.name in ELSEWHERE):
                broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no such heading in {destination.name}")
    assert not broken, f"{name_of(page)}: {broken}"


# --------------------------------------------------------------------------------------------------
# What docs/loading.md and docs/api.md quote
# --------------------------------------------------------------------------------------------------

def mapping_table(*tables: dict) -> str:
    rows = [f"| `{ours}` | " + " + ".join(f"`{name}`" for name in (theirs if isinstance(theirs, list) else [theirs])) + " |"
            for table in tables for ours, theirs in table.items()]
    return "| official | diffusers |\n| --- | --- |\n" + "\n".join(rows) + "\n"


def test_key_tables_are_the_loaders():
    from flux.weights import layouts

    text = (DOCS / "loading.md").read_text(encoding="utf-8")
    for tables in ((layouts.DIFFUSERS_MODULES, layouts.DIFFUSERS_FUSED, layouts.DIFFUSERS_TENSORS),
                   (layouts.AUTOENCODER_DIFFUSERS_MODULES,), (layouts.AUTOENCODER_DIFFUSERS_RESNET,),
                   (layouts.AUTOENCODER_DIFFUSERS_ATTENTION,)):
        table = mapping_table(*tables)
        assert table in text, f"docs/loading.md should hold this table, as flux/weights/layouts.py has it now:\n{table}"


def test_quoted_error_messages_are_in_the_code():
    source = "\n".join(path.read_text(encoding="utf-8") for path in sorted((ROOT / "flux").rglob("*.py")))
    quoted = [fragment for row in re.findall(r"^\| (`[^|]+) \|", section(DOCS / "loading.md", "Errors"), re.MULTILINE)
              for fragment in re.findall(r"`([^`]+)`", row)]
    assert len(quoted) >= 40, f"docs/loading.md: found only {len(quoted)} quoted messages"
    missing = [fragment for fragment in quoted if fragment not in source]
    assert not missing, f"docs/loading.md quotes error messages the code no longer has: {missing}"


def test_command_options_are_documented():
    import argparse

    from flux.cli.main import parser

    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    options = {"prompt"} | {name for action in commands.choices["generate"]._actions for name in action.option_strings
                            if name not in ("-h", "--help")}
    rows = re.findall(r"^\| (`[^|]+) \|", section(DOCS / "api.md", "The `flux` command"), re.MULTILINE)
    documented = {name for row in rows for name in re.findall(r"`([^`]+)`", row)}
    assert documented == options, (f"docs/api.md, the `flux` command: undocumented {sorted(options - documented)}, "
                                   f"no longer there {sorted(documented - options)}")
