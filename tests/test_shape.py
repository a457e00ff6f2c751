"""The library's shape, read from its source: no import cycle between files, no private name imported
across modules, every registered step declares what it reads and writes, and every schema it writes
is one of ``store/schema.py``'s."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pyarrow as pa

from tests.conftest import REPO

LIBRARY = REPO / "pipeline"


def _modules() -> dict[str, Path]:
    out = {}
    for path in LIBRARY.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Each module's imports of other library modules (lazy ones too: a function-level import is a
    dependency as well), and every ``from x import _name`` across modules."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*parts, node.module] if node.module else parts) if node.level else node.module
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    found = full if full in modules else target
                    if found in modules and found != module:
                        edges[module].add(found)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and found == target and (
                            target in modules and target != module):  # fmt: skip
                        private.append(f"{module}: from {target} import {alias.name}")
            elif isinstance(node, ast.Import):
                edges[module].update(a.name for a in node.names if a.name in modules and a.name != module)
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle_between_files():
    edges, _ = _imports(_modules())
    assert sum(map(len, edges.values())) > 50  # the graph was read
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_imported_across_modules():
    assert _imports(_modules())[1] == []


def _steps() -> list[type]:
    from pipeline.core.step import Step

    for module in _modules():
        importlib.import_module(module)
    found, todo = [], list(Step.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_step_declares_its_reads_and_a_schema_of_store_schema():
    from pipeline.core.step import LISTED
    from pipeline.embed import CaptionEmbed, Embed
    from pipeline.embed.imported import ImportEmbeddings
    from pipeline.store import schema as S

    declared = [v for v in vars(S).values() if isinstance(v, pa.Schema)]
    steps = _steps()
    assert {cls.name for cls in steps} >= {"download", "filters", "decisions", "metaclip_match", "metaclip", "mode",
                                          "image_based", "dedup", "rebalance"}  # fmt: skip
    stages = set(S.STAGE_SCHEMAS) | {"embed", "caption_embed", LISTED}
    sized = {"embed": S.embed_schema, "caption_embed": S.caption_embed_schema}  # the vectors' width varies
    assert {cls.name for cls in steps} >= set(sized)
    for cls in steps:
        if cls.name in sized:
            assert cls.sized is sized[cls.name] and cls.sized(8).field(cls.sized_column), cls
        else:
            assert cls.name in S.STAGE_SCHEMAS and cls.schema.equals(S.STAGE_SCHEMAS[cls.name]), cls
            assert any(cls.schema.equals(d) for d in declared), cls
        # a pure function, or (the download: img2dataset writes its tar) a producer of declared files
        assert "__call__" in vars(cls) or (cls.files and "produce" in vars(cls)), f"{cls.__name__} has no function"
    examples = _example_steps()
    assert {Embed, CaptionEmbed, ImportEmbeddings} <= {type(step) for step in examples} <= set(steps)
    for step in examples:
        assert step.reads, step
        for read in step.reads:
            assert read.table in stages and read.columns, (step, read)
        if step.streams:  # its images come as batches, encoded as they arrive
            assert "encode" in vars(type(step)) and "transform" in vars(type(step)), step


def _example_steps() -> list:
    """An instance of each step, with a config of the demo's shape (reads may depend on the config)."""
    from pipeline.config import EmbedConfig, EmbedSourceConfig, MetaclipConfig, ModeConfig
    from pipeline.embed import CaptionEmbed, Embed
    from pipeline.embed.imported import ImportEmbeddings
    from pipeline.filters.decisions import Decide
    from pipeline.filters.image_based import AssignImageClusters
    from pipeline.filters.rules import recipe_rules
    from pipeline.filters.stage import CaptionScores
    from pipeline.metaclip.stage import Balance, Match
    from pipeline.mode.stage import AssignExperts

    metaclip = MetaclipConfig(metadata=str(REPO / "metadata" / "entries.json"))
    rules = recipe_rules("basic", {}, decoded=True)
    return [CaptionScores("d"), Decide(rules, "d"), Match(metaclip), Balance("/p", metaclip, 1.0, "d"),
            AssignExperts("/p", ModeConfig(), "d"), AssignImageClusters("/p/c.npz", "d"),
            Embed(EmbedConfig(model="m", checkpoint="c"), "sha"), CaptionEmbed("minilm", "d"),
            ImportEmbeddings(EmbedConfig(model="m", source=EmbedSourceConfig(path="/p", format="clip-retrieval")),
                             "d")]  # fmt: skip


def test_no_function_of_the_library_is_over_60_lines():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == []


def test_nothing_in_the_library_constructs_an_engine_but_get_engine():
    """The engine is chosen once, from the config (``pipeline.engines.get_engine``)."""
    found = []
    for module, path in _modules().items():
        if module.startswith("pipeline.engines"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("LocalEngine", "SparkEngine"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []
