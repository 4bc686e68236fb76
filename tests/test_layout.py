"""The package's layout holds: rooms that import only the rooms below them, no import cycle, no runtime import of the
test fixtures, one error dialect, files of at most 600 lines, a family registry with a tiny builder per family, and
the public names of before the rooms (docs/architecture.md).

Read from the source with ``ast`` (nothing is imported to find the imports), so a function-level import counts.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

import attnprobe
import attnprobe._moved as _MOVED

SRC = Path(attnprobe.__file__).resolve().parent

#: The rooms from the ground up: a module may import modules of its own room and of the rooms before it.
ROOMS = ("_ground", "text", "store", "capture", "analysis", "interventions", "models", "study", "_face")
#: Top-level modules: the ground floor (imported by every room) and the public face (imports the rooms).
GROUND = ("errors", "_atomic", "_version", "_moved", "_quiet")
FACE = ("__init__", "__main__", "testing")

#: Builtin exceptions that are protocol, not an error raised on purpose for a user.
PROTOCOL = {"NotImplementedError", "SystemExit", "KeyboardInterrupt", "StopIteration", "AttributeError"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(("attnprobe",) + parts)
        found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, ast.AST]]:
    """Every attnprobe module ``name`` imports (a name imported from a package that is a submodule counts as that
    submodule), with the node."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith("attnprobe"):
                out.append((target, node))
    return out


def _room(name: str) -> str:
    parts = name.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in FACE):
        return "_face"
    if len(parts) == 2 and parts[1] in GROUND:
        return "_ground"
    return parts[1]


def test_every_module_is_in_a_room():
    assert {_room(n) for n in MODULES} <= set(ROOMS), sorted({_room(n) for n in MODULES} - set(ROOMS))
    assert sum(1 for n in MODULES if n.count(".") == 1 and (SRC / n.split(".")[1]).is_dir()) >= 4


def test_rooms_import_only_the_rooms_below_them():
    rank = {room: i for i, room in enumerate(ROOMS)}
    upward = [f"{name} → {target}" for name, path in MODULES.items() for target, _ in _imports(name, path)
              if rank[_room(target)] > rank[_room(name)]]
    assert not upward, "imports that run up:\n" + "\n".join(sorted(set(upward)))


def test_no_import_cycle():
    graph = {name: {t for t, _ in _imports(name, path) if t != name} for name, path in MODULES.items()}
    # the package's face imports every room; a room reaching the face would be a cycle through it
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend(trail[trail.index(nxt):] + [node, nxt] if nxt in trail else [node, nxt])
                return True
            if nxt not in state and visit(nxt, trail + [node]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if start not in state and visit(start, []):
            break
    assert not cycle, "import cycle: " + " → ".join(cycle)


def test_imports_of_attnprobe_modules_are_at_module_level():
    local = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        top = {n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        for target, node in _imports(name, path):
            if node.lineno not in top:
                local.append(f"{path.relative_to(SRC)}:{node.lineno} imports {target} inside a function or block")
    assert not local, "\n".join(local)


def test_no_runtime_module_imports_the_fixtures():
    users = sorted({name for name, path in MODULES.items() for target, _ in _imports(name, path)
                    if target == "attnprobe.testing"})
    assert not users, f"{users} import attnprobe.testing (the fixtures re-export attnprobe.models; import that)"


def test_every_error_raised_on_purpose_is_an_attnprobe_error():
    exceptions = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type)
                  and issubclass(getattr(builtins, n), BaseException)}
    bare = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id in exceptions and exc.id not in PROTOCOL:
                    bare.append(f"{path.relative_to(SRC)}:{node.lineno}: raise {exc.id}")
    assert not bare, "raise an attnprobe.errors class (subclassing the builtin) instead:\n" + "\n".join(bare)


def test_errors_keep_their_builtin_kinds():
    assert issubclass(attnprobe.ConfigError, ValueError) and issubclass(attnprobe.ArgumentError, ValueError)
    assert issubclass(attnprobe.ArgumentTypeError, TypeError) and issubclass(attnprobe.SelectionError, IndexError)
    assert issubclass(attnprobe.UnknownSiteError, KeyError) and issubclass(attnprobe.NumericalError, FloatingPointError)
    assert all(issubclass(getattr(attnprobe, n), attnprobe.AttnprobeError) for n in attnprobe.__all__ if n.endswith("Error"))


def test_no_file_is_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_every_family_has_a_tiny_builder():
    from attnprobe.capture import FAMILIES, denoiser_of, family_of
    from attnprobe.capture.families import GENERIC
    from attnprobe.testing import TINY_PIPELINES, tiny_pipeline

    names = [f.name for f in FAMILIES]
    assert len(set(names)) == len(names) and GENERIC.name not in names
    built = {family_of(denoiser_of(tiny_pipeline(name))).name for name in TINY_PIPELINES}
    assert built == set(names)


def test_a_denoiser_of_no_known_family_is_generic():
    from diffusers import UNet2DConditionModel

    from attnprobe.capture import family_of

    class MyUNet(UNet2DConditionModel):  # a subclass still belongs to its family
        pass

    assert family_of(MyUNet(block_out_channels=(8, 8), norm_num_groups=4, cross_attention_dim=8,
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                            layers_per_block=1, sample_size=8)).name == "unet"
    assert family_of(__import__("torch").nn.Linear(2, 2)).name == "generic"


@pytest.mark.parametrize("module", ["attnprobe", "attnprobe.text", "attnprobe.testing", "attnprobe.study"])
def test_public_names_resolve(module):
    import importlib

    mod = importlib.import_module(module)
    assert all(hasattr(mod, n) for n in mod.__all__)


def test_attnprobe_study_is_the_package_and_runs_the_study():
    import importlib

    assert attnprobe.study is importlib.import_module("attnprobe.study")
    assert callable(attnprobe.study) and attnprobe.study.SHAPES_VARIANTS["baseline"] == "a {c} on the left"
    assert attnprobe.probe is attnprobe.capture.probe and callable(attnprobe.probe)


#: The public names of attnprobe 0.1.0 (before the rooms), by the module that held them.
OLD_NAMES = {
    "attnprobe": ("AttentionEdit AttentionStore AttnprobeError Call Comparison ConceptError ConditioningEdit Intervened "
        "InterventionError ModelLoadError NegativePrompt NoSitesError ProbeError SafeLatentDiffusion Sample "
        "SelectionError Site StoreError UnknownSiteError auc compare heatmap intervene list_sites load_config "
        "parse_interventions probe study trajectory"),
    "attnprobe.analysis": "trajectory auc compare heatmap Comparison concept_positions",
    "attnprobe.capture": "call_filter check_tokens resolve_tokens CallSink AGGREGATES IN_FLIGHT",
    "attnprobe.cli": "main",
    "attnprobe.config": ("load_config CONFIG_KEYS CAPTURE DTYPES STUDY_PARTS check_grid check_capture check_models "
        "check_earlier_run check_out is_study_folder resolve_dtype"),
    "attnprobe.editing": "intervene Intervened denoiser_timesteps",
    "attnprobe.errors": ("AttnprobeError NoSitesError UnknownSiteError ProbeError ConceptError SelectionError StoreError "
        "ModelLoadError InterventionError"),
    "attnprobe.interventions": ("AttentionEdit ConditioningEdit NegativePrompt SafeLatentDiffusion Intervention INTERVENTIONS "
        "parse_interventions"),
    "attnprobe.joint": "JOINT_MODES CHUNK_ELEMENTS joint_probs site_kind JointProbeProcessor",
    "attnprobe.models": "TINY_MODELS OFFLINE_MODELS load_pipeline",
    "attnprobe.plot": ("plot_trajectories plot_delta_auc plot_heatmaps plot_text_similarity plot_site_call_grid "
        "plot_presence"),
    "attnprobe.probe": "probe",
    "attnprobe.processors": "ProbeProcessor CaptureState wrap_processor attention_probs reduce_probs",
    "attnprobe.report": "OUTPUT_FILES summarize write_tables write_figures format_summary write_atomic",
    "attnprobe.runner": "Cell grid Manifest Processes processes write_cell read_cell collect settings_key FolderLock",
    "attnprobe.scorer": "PresenceScorer CLIPScorer ShapesScorer load_scorer CLIPSCORE_W checked_range checked_scores",
    "attnprobe.shards": "HEADER ShardWriter shard_paths read_shard_call read_site",
    "attnprobe.sites": "Site list_sites select_sites denoiser_of",
    "attnprobe.store": "AttentionStore Call Sample FORMAT_VERSION",
    "attnprobe.study": ("study StudyResult DEFAULT_CONCEPTS DEFAULT_VARIANTS SHAPES_CONCEPTS SHAPES_VARIANTS load_pipeline "
        "parse_variants"),
    "attnprobe.testing": ("clip_tokenizer shapes_pipeline full_size_pipeline tiny_sd_pipeline tiny_sdxl_pipeline tiny_clip "
        "tiny_sd3_pipeline tiny_flux_pipeline tiny_pixart_pipeline t5_tokenizer SD3_MEDIUM_TRANSFORMER "
        "SD35_MEDIUM_TRANSFORMER FLUX_DEV_TRANSFORMER transformer_on_meta SD15_UNET SD21_UNET SDXL_UNET "
        "unet_on_meta synthetic_store"),
    "attnprobe.text": ("EncoderStates TextEncoding EncoderComparison TextComparison encode_text compare_text ablate_words "
        "instruction_attention instruction_positions"),
    "attnprobe.tokens": "TokenLayout token_layout find_concept unlabelled_layout decode_ids concat_layouts",
    "attnprobe.variants": ("DEFAULT_CONCEPTS DEFAULT_VARIANTS SHAPES_CONCEPTS SHAPES_VARIANTS model_defaults parse_variants "
        "shapes_concept_warnings"),
    "attnprobe.zoo.shapes": ("COLOURS SHAPES POSITIONS Shape Scene render caption sample_objects read_scene area_matched_iou "
        "threshold_iou peak_inside mass_inside"),
    "attnprobe.zoo.shapes_eval": ("caption_following match_objects localisation_real localisation_generated evaluate sample_captions "
        "caption_following match_objects localisation_real localisation_generated evaluate sample_captions"),
    "attnprobe.zoo.shapes_model": "HELD_OUT SIZE MAX_TOKENS build_components make_dataset train load weights_folder",
}


@pytest.mark.parametrize("module", sorted(OLD_NAMES))
def test_the_names_of_0_1_0_resolve_at_their_old_paths(module):
    """Old module paths keep working (a stand-in, ``attnprobe._moved``), with a FutureWarning naming the new path."""
    import importlib
    import warnings

    mod = importlib.import_module(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        missing = [n for n in OLD_NAMES[module].split() if not hasattr(mod, n)]
    assert not missing
    moved = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert all(" is now attnprobe." in m for m in moved)
    assert bool(moved) == (module in _MOVED.MOVED or module in _MOVED.LEFT)


def test_old_paths_say_what_replaced_what_is_gone():
    import attnprobe.zoo.shapes

    with pytest.warns(FutureWarning, match="attnprobe.zoo.shapes.render is now attnprobe.models.shapes.scenes.render"):
        assert attnprobe.zoo.shapes.render is attnprobe.models.shapes.scenes.render
    with pytest.raises(AttributeError, match="text_streams is gone; use the denoiser family's text_streams"):
        attnprobe.joint.text_streams
    with pytest.raises(AttributeError, match=r"'attnprobe.plot' has no attribute 'nope' \(its names are now in"):
        attnprobe.plot.nope
    with pytest.raises(AttributeError, match="module 'attnprobe' has no attribute 'nope'"):
        attnprobe.nope
    names: dict = {}
    exec("from attnprobe.plot import *", names)  # a stand-in exports what its new modules export
    assert names["plot_heatmaps"] is attnprobe.analysis.figures.plot_heatmaps
    with pytest.warns(FutureWarning):
        assert callable(attnprobe.zoo.shapes.main)  # 0.1.0's `python -m attnprobe.zoo.shapes` entry


def test_import_and_a_tiny_pipeline_print_nothing():
    """``import attnprobe`` prints nothing, and neither does building a tiny pipeline (diffusers' pipeline modules
    import transformers' image processors, which without torchvision log a fallback note: attnprobe's builders drop
    that note while they run, and leave transformers' logger without the filter afterwards). ``import attnprobe``
    imports none of diffusers' pipeline modules: they took about a second of it (the tiny HunyuanVideo template read
    diffusers' own when the package was imported)."""
    import subprocess
    import sys

    code = ("import logging, attnprobe\n"
            "from attnprobe.testing import tiny_sd_pipeline\n"
            "tiny_sd_pipeline()\n"
            "assert not logging.getLogger('transformers.utils.import_utils').filters\n")
    bare = ("import sys, attnprobe\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('diffusers.pipelines.'))\n"
            "assert not loaded, loaded\n")
    for script in (bare, code):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "" and done.stderr == "", (script, done.stdout, done.stderr)
