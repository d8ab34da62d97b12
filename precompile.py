"""--compile-cache, warm starts: the blocks' compiled graphs saved whole, so that a second process traces nothing.

torch's compile cache (inductor's and AOTAutograd's) skips code generation in a warm process, but not dynamo: it
still traces each block kind's bytecode and propagates fake tensors through it before it can look the compiled code
up, about 9 s of a warm start on an H200 (BENCHMARKS.md, run 26). torch's ahead-of-time compile
(`torch.compile(fn, fullgraph=True).aot_compile(example_inputs)`, in torch 2.11 and later) instead returns the graph
with its guards and its compiled code as one object that `save_compiled_function` writes to a file and
`torch.compiler.load_compiled_function` reads back: no tracing at all.

One `PrecompiledBlocks` per block kind (double, single) stands where `nn.Module.compile` would: it calls the first of
its graphs whose guards accept the call (shapes, dtypes, batch 1 or more, the weights' dtypes), and compiles, saves
and keeps a new graph where none does, as dynamo would recompile. Dynamic shapes work as with torch.compile: one
graph serves every size. Where torch cannot precompile a block kind (a guard or an object its version cannot
serialize), dynamo compiles that kind as it would without a directory, with a warning.

A stale graph must never run. Each file's name carries a digest of everything the graph depends on (`graph_key`:
torch and Python versions, the device, the sources that can be traced into a block, the Options that shape the
graph, the compile settings), and the file holds that key in full, compared on load; torch itself refuses an
artifact made by another torch, Python, CUDA, Triton or GPU. A file that fails any check is reported, removed and
compiled again. The files are pickles, trusted as torch's own compile cache is.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import io
import json
import os
import pickle
import platform
import sys
import tempfile

import torch

# The files whose code runs inside a block's graph: the blocks, attention, GELU; fp8's layers; the 8-bit attention;
# context parallelism's attention. Any edit to them invalidates every saved graph.
TRACED_SOURCES = ("optimized_inference.py", "fp8.py", "attention_fp8.py", "context_parallel.py")
HERE = os.path.dirname(os.path.abspath(__file__))


def available() -> bool:
    """torch.compile(...).aot_compile and torch.compiler.load_compiled_function: torch 2.11 and later."""
    return hasattr(torch.compiler, "load_compiled_function")


def graph_key(block: torch.nn.Module, opts, options: dict, dynamic: bool) -> dict:
    """Everything a block kind's compiled graph depends on, beyond what its guards check on each call."""
    device = next(block.parameters()).device
    sources = hashlib.sha256()
    for name in TRACED_SOURCES:
        with open(os.path.join(HERE, name), "rb") as f:
            sources.update(f.read())
    # LoRAs are weights, and the VAE's options shape no block: a graph serves whatever they are
    opts = {k: v for k, v in dataclasses.asdict(opts).items() if not k.startswith("lora") and "vae" not in k}
    return {  # the module's name too: the script run as __main__ and imported as optimized_inference save apart
        "kind": f"{type(block).__module__}.{type(block).__qualname__}", "torch": torch.__version__,
        "python": platform.python_version(), "device": str(device.type),
        "gpu": (torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
        if device.type == "cuda" else None,
        "sources": sources.hexdigest(), "options": opts, "inductor options": options, "dynamic": dynamic,
        "duck sizing": torch.fx.experimental._config.use_duck_shape,
        "specialize float": torch._dynamo.config.specialize_float,
    }


class PrecompiledBlocks:
    """One block kind's compiled graphs: loaded from `directory`, or compiled ahead of time on first use and saved."""

    def __init__(self, block: torch.nn.Module, directory: str, opts, options: dict, dynamic: bool):
        self.forward = type(block).forward  # called with the block as its first argument
        self.compile = dict(fullgraph=True, dynamic=dynamic, options=options)
        self.key = graph_key(block, opts, options, dynamic)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.stem = os.path.join(directory, f"{type(block).__name__}-{digest}")
        os.makedirs(directory, exist_ok=True)
        self.graphs, self.compiled = [], 0
        self.dynamo = None  # dynamo's compiled forward, where torch cannot precompile this block kind
        for path in sorted(glob.glob(f"{self.stem}-*.pt")):
            self.load(path)
        self.loaded = len(self.graphs)

    def load(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                saved = pickle.load(f)
            if saved["key"] != self.key:
                raise ValueError("made for another key: " + ", ".join(
                    k for k in self.key.keys() | saved["key"].keys() if saved["key"].get(k) != self.key.get(k)))
            # The block's own module as the graph's globals: its functions as this process defines them.
            graph = torch.compiler.load_compiled_function(io.BytesIO(saved["graph"]),
                                                          f_globals=self.forward.__globals__)
        except Exception as e:  # another torch or GPU, a damaged or planted file: compile again instead
            reason = (str(e).splitlines() or [""])[0]
            print(f"warning: saved graph {path} not used ({type(e).__name__}: {reason}); it is compiled again",
                  file=sys.stderr)
            os.remove(path)
            return
        graph.disable_guard_check()  # __call__ checks them, once
        self.graphs.append(graph)

    def __call__(self, block: torch.nn.Module, *args):
        for graph in self.graphs:
            if graph.guard_check(block, *args):
                return graph(block, *args)
        graph = self.precompile(block, *args) if self.dynamo is None else None
        return self.dynamo(block, *args) if graph is None else graph(block, *args)

    def precompile(self, block: torch.nn.Module, *args):
        """A new graph for these inputs, compiled ahead of time and saved. None where this torch cannot (a guard or an
        object it cannot serialize): from then on dynamo compiles this block kind, as without a directory."""
        try:
            graph = torch.compile(self.forward, **self.compile).aot_compile(((block, *args), {}))
        except Exception as e:  # a real error in the block raises again from dynamo's compile
            print(f"warning: {self.forward.__qualname__} cannot be precompiled ({type(e).__name__}: "
                  f"{(str(e).splitlines() or [''])[0]}); dynamo compiles it, unsaved", file=sys.stderr)
            self.dynamo = torch.compile(self.forward, **self.compile)
            return None
        self.save(graph)
        graph.disable_guard_check()
        self.graphs.append(graph)
        self.compiled += 1
        return graph

    def save(self, graph) -> None:
        """Under the first free name, written whole or not at all (a temporary file renamed); where it cannot be
        written, the graph still serves this process."""
        try:
            self.write(graph)
        except (OSError, RuntimeError, pickle.PicklingError) as e:
            print(f"warning: {self.forward.__qualname__}'s graph not saved ({type(e).__name__}: "
                  f"{(str(e).splitlines() or [''])[0]}); the next process compiles it again", file=sys.stderr)

    def write(self, graph) -> None:
        with tempfile.TemporaryDirectory(dir=os.path.dirname(self.stem)) as tmp:
            graph.save_compiled_function(os.path.join(tmp, "graph"))
            with open(os.path.join(tmp, "graph"), "rb") as f:
                data = pickle.dumps({"key": self.key, "graph": f.read()})
            with open(os.path.join(tmp, "saved"), "wb") as f:
                f.write(data)
            n = 0
            while os.path.exists(f"{self.stem}-{n}.pt"):  # a removed stale file leaves a gap: fill it
                n += 1
            os.replace(os.path.join(tmp, "saved"), f"{self.stem}-{n}.pt")


def precompile_blocks(model: torch.nn.Module, directory: str, options: dict, dynamic: bool) -> list:
    """Each block's calls go to its kind's PrecompiledBlocks, through the attribute that nn.Module.compile sets."""
    # torch 2.11 gives torch.compile's function its aot_compile only with this switch on (2.13: on by default); run 31
    # on an H200 fell back to dynamo for want of it.
    torch._dynamo.config.enable_aot_compile = True
    kinds = {}
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        if type(block) not in kinds:
            kinds[type(block)] = PrecompiledBlocks(block, directory, model.opts, options, dynamic)
        block._compiled_call_impl = functools.partial(kinds[type(block)], block)
    return list(kinds.values())
