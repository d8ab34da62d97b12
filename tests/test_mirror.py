"""The two inference scripts mirror each other on purpose: each is one readable file. The plumbing they share (configs,
schedule, loading, tokenizers, timing, PNG writing, ...) must stay the same source in both, so that a fix made to one
cannot skip the other; what differs is the list of optimizations."""

import ast
import io
import os

import pytest

from tests.helpers import REPO_ROOT

MIRRORED = [
    "FluxConfig", "FLUX_DEV_SCHEDULER", "FLUX_SCHNELL_SCHEDULER", "CONFIGS", "config_from_checkpoint",
    "CLIP_L_CONFIG", "T5_XXL_CONFIG", "FLUX_VAE_CONFIG", "UserError",
    "timestep_embedding", "modulate", "rms_norm", "latent_grid", "pack", "unpack", "image_ids", "flow_match_sigmas",
    "MLPEmbedder", "TimeTextEmbed", "QKNorm", "init_random_",
    "COMPONENTS", "read_json", "read_safetensors", "transformer_state_dict", "load_weights_strict", "ByteTokenizer",
    "load_tokenizers", "from_folder", "default_dtype", "warn", "initial_noise", "Request",
    "Timer", "timed_runs", "sync", "summarize", "HelpFormatter", "MAX_SIDE", "check_common_args", "check_writable",
    "check_size", "save_png", "as_user_error",
]


def top_level_sources(script: str) -> dict[str, str]:
    """{name: source} of every top-level function, class and assignment of a script."""
    with open(os.path.join(REPO_ROOT, script)) as f:
        source = f.read()
    # ast.get_source_segment splits its whole source into lines on every call (3 s for the two scripts' ~300
    # definitions): it gets just the node's lines, split as it splits them (on \n, \r\n and \r only).
    lines = io.StringIO(source, newline="").readlines()
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        else:
            continue
        first = node.lineno
        node.lineno, node.end_lineno = 1, node.end_lineno - first + 1
        segment = ast.get_source_segment("".join(lines[first - 1:first - 1 + node.end_lineno]), node)
        for name in names:
            out[name] = segment
    return out


@pytest.fixture(scope="module")
def sources():
    return top_level_sources("single_file_inference.py"), top_level_sources("optimized_inference.py")


@pytest.mark.parametrize("name", MIRRORED)
def test_mirrored_plumbing_is_the_same_source(name, sources):
    reference, optimized = sources
    assert name in reference and name in optimized, name
    assert optimized[name] == reference[name], f"{name} differs between the scripts: change both or neither"


def test_everything_else_of_the_reference_is_in_the_optimized_script(sources):
    """The optimized script has every definition of the reference (changed or not), so `diff` pairs them up."""
    reference, optimized = sources
    assert set(reference) <= set(optimized), sorted(set(reference) - set(optimized))
