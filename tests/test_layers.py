"""The layer contract of docs/design.md, checked on the source text (ast, nothing is imported).

    posterrl (shared, bottom)  <-  rollout, reward_server, learner (middle)  <-  actors  <-  CLI

(a) only actors/ imports ray;
(b) posterrl/ imports none of the packages above it at module level (posterrl/cli.py, the CLI entry
    point, dispatches to them lazily from inside its functions, and only there); the middle packages
    import neither each other nor actors/, anywhere; nothing imports the CLI module;
(c) the driver modules of actors/ (all but actors/learner_group.py) do not import DeepSpeed at module
    level: not `deepspeed` itself, and no learner module whose own module-level imports reach it
    (learner.core, learner.distributed, ...), so the driver process does not load DeepSpeed for a
    constant or a dataclass.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("posterrl", "actors", "learner", "reward_server", "rollout")
MIDDLE = ("rollout", "reward_server", "learner")
CLI_MODULE = "posterrl.cli"
LEARNER_WRAPPER = "actors.learner_group"  # the one actors module that holds the DeepSpeed learner class
DEEPSPEED_MODULES = ("learner.engine", "learner.core")  # forbidden in drivers even if their imports change


@dataclass(frozen=True)
class ImportStmt:
    line: int
    module_level: bool  # False inside a function body (runs only when the function is called)
    targets: tuple[str, ...]  # dotted names it may load: `from a.b import c` -> ("a.b", "a.b.c")
    text: str
    type_checking: bool = False  # under `if TYPE_CHECKING:`: never runs, but still a dependency on those types


def module_name(relative: str) -> str:
    """posterrl/data/sheet.py -> posterrl.data.sheet; learner/tasks/__init__.py -> learner.tasks."""
    parts = list(Path(relative).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of a relative `from ... import` in `module`."""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join([*parts, name] if name else parts)


def parse_imports(source: str, module: str, is_package: bool = False) -> list[ImportStmt]:
    """Every import statement of a module's source, with where it sits (module level or in a function)."""
    found: list[ImportStmt] = []

    def is_type_checking(node: ast.AST) -> bool:
        test = node.test if isinstance(node, ast.If) else None
        return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")

    def visit(node: ast.AST, in_function: bool, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.append(ImportStmt(child.lineno, not in_function, tuple(a.name for a in child.names),
                                        ast.unparse(child), typing_only))
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, is_package, child.level, child.module) if child.level else child.module or ""
                targets = (base, *(f"{base}.{a.name}" for a in child.names if a.name != "*"))
                found.append(ImportStmt(child.lineno, not in_function, targets, ast.unparse(child), typing_only))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                  typing_only or is_type_checking(child))

    visit(ast.parse(source), False, False)
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


def _within(name: str, prefixes: tuple[str, ...] | set[str]) -> str | None:
    """The prefix `name` is (or lies under), if any."""
    return next((p for p in prefixes if name == p or name.startswith(p + ".")), None)


def deepspeed_paths(modules: dict[str, list[ImportStmt]]) -> dict[str, list[str]]:
    """For each learner module whose loading loads DeepSpeed at module level: one chain of imports to it.

    Loading `a.b.c` runs a, a.b and a.b.c, so a module's parents count as part of it.
    """

    def loads(name: str) -> list[str]:  # the first-party modules that `import name` runs (parents first)
        parts = name.split(".")
        return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in modules]

    paths: dict[str, list[str]] = {}
    for start in (m for m in modules if _top(m) == "learner"):
        queue = deque([start] if m == start else [start, m] for m in loads(start))
        seen: set[str] = set()
        while queue:
            chain = queue.popleft()
            if chain[-1] in seen:
                continue
            seen.add(chain[-1])
            stmts = [s for s in modules[chain[-1]] if s.module_level and not s.type_checking]
            if any(_within(t, ("deepspeed",)) for s in stmts for t in s.targets):
                paths[start] = [*chain, "deepspeed"]
                break
            queue.extend([*chain, m] for s in stmts for t in s.targets for m in loads(t) if m not in seen)
    return paths


def check_module(module: str, path: str, stmts: list[ImportStmt],
                 heavy: dict[str, list[str]] | None = None) -> list[str]:
    """The contract's violations in one module; `heavy`: learner modules that load DeepSpeed (and how)."""
    heavy = heavy or {}
    layer, problems = _top(module), []
    for s in stmts:
        where = f"{path}:{s.line}: `{s.text}`" + (" (under TYPE_CHECKING)" if s.type_checking else "")
        tops = {_top(t) for t in s.targets}
        if "ray" in tops and layer != "actors":
            problems.append(f"{where}: imports ray outside actors/ (only actors/ may use Ray)")
        if layer == "posterrl":
            upper = sorted(tops & {*MIDDLE, "actors"})
            if upper and (module != CLI_MODULE or s.module_level):
                allowed = " (posterrl/cli.py may, inside a function)" if module == CLI_MODULE else ""
                problems.append(f"{where}: posterrl/ is the bottom layer and imports {', '.join(upper)} at "
                                f"{'module level' if s.module_level else 'function level'}{allowed}")
        if layer in MIDDLE:
            other = sorted(tops & ({*MIDDLE, "actors"} - {layer}))
            if other:
                problems.append(f"{where}: {layer}/ is a middle layer and imports {', '.join(other)} "
                                "(the middle layers import only posterrl/)")
        if module != CLI_MODULE and any(_within(t, (CLI_MODULE,)) for t in s.targets):
            problems.append(f"{where}: imports the CLI entry point {CLI_MODULE}, the top layer")
        if layer == "actors" and module != LEARNER_WRAPPER and s.module_level and not s.type_checking:
            for target in s.targets:
                if _within(target, ("deepspeed",)):
                    why = "deepspeed"
                elif (hit := _within(target, (*DEEPSPEED_MODULES, *heavy))) is not None:
                    why = " -> ".join(heavy.get(hit, [hit]))
                else:
                    continue
                problems.append(f"{where}: loads DeepSpeed at module level ({why}); only "
                                f"{LEARNER_WRAPPER.replace('.', '/')}.py may, other driver modules import it "
                                "inside a function or take the name from posterrl/")
                break
    return problems


def package_sources() -> dict[str, tuple[str, str, bool]]:
    """module -> (relative path, source, is_package) for every .py of the five packages."""
    out = {}
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            relative = file.relative_to(ROOT).as_posix()
            out[module_name(relative)] = (relative, file.read_text(), file.name == "__init__.py")
    return out


def contract_violations(sources: dict[str, tuple[str, str, bool]]) -> list[str]:
    modules = {m: parse_imports(src, m, is_pkg) for m, (_, src, is_pkg) in sources.items()}
    heavy = deepspeed_paths(modules)
    return [p for m, stmts in modules.items() for p in check_module(m, sources[m][0], stmts, heavy)]


# ---------------------------------------------------------------------------------------- the contract


def test_the_packages_keep_the_layer_contract():
    sources = package_sources()
    assert len(sources) > 20 and CLI_MODULE in sources  # the walk found the tree
    problems = contract_violations(sources)
    assert not problems, "layer contract (docs/design.md) broken:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------------- the checker


def _violations(files: dict[str, str]) -> list[str]:
    return contract_violations({module_name(p): (p, src, p.endswith("__init__.py")) for p, src in files.items()})


def test_ray_outside_actors_is_caught_even_inside_a_function():
    problems = _violations({
        "rollout/worker.py": "import os\n\ndef f():\n    from ray.util import get_node_ip_address\n",
        "actors/rl.py": "import ray\n",
    })
    assert problems == ["rollout/worker.py:4: `from ray.util import get_node_ip_address`: imports ray outside "
                        "actors/ (only actors/ may use Ray)"]


def test_posterrl_importing_upward_is_caught_except_lazily_in_the_cli():
    problems = _violations({
        "posterrl/cli.py": "from reward_server.registry import RegistryError\n\n"
                           "def run():\n    from actors.pipeline import run_pipeline\n",
        "posterrl/config.py": "def f():\n    import learner.nft\n",
        "posterrl/data/sheet.py": "from ..policy import EditPolicy\n",  # relative, inside posterrl: fine
    })
    assert len(problems) == 2
    assert problems[0].startswith("posterrl/cli.py:1: `from reward_server.registry import RegistryError`: ")
    assert "module level" in problems[0]
    assert problems[1].startswith("posterrl/config.py:2: `import learner.nft`: ")


def test_middle_layers_importing_each_other_or_actors_is_caught():
    problems = _violations({"learner/engine.py": "from reward_server import bradley_terry\n",
                            "reward_server/x.py": "import posterrl.config\n\ndef g():\n    import actors.context\n",
                            "rollout/y.py": "from posterrl.cli import main\n"})
    assert [p.split(": `")[0] for p in problems] == ["learner/engine.py:1", "reward_server/x.py:4", "rollout/y.py:1"]
    assert "imports reward_server" in problems[0] and "imports actors" in problems[1]
    assert "CLI entry point" in problems[2]


def test_drivers_loading_deepspeed_at_module_level_are_caught():
    problems = _violations({
        "learner/__init__.py": "",
        "learner/distributed.py": "import deepspeed\n",
        "learner/core.py": "from learner.distributed import deepspeed\nclass StepStats: ...\n",
        "learner/nft.py": "import torch\n",
        "actors/rl.py": "from learner.core import StepStats\nfrom learner.nft import nft_loss\n",
        "actors/training.py": "from learner import distributed\n\ndef f():\n    from learner.core import Learner\n",
        "actors/evaluation.py": "import deepspeed.comm\n",
        "actors/learner_group.py": "from learner.core import Learner\n",  # the one allowed place
    })
    assert [p.split(": `")[0] for p in problems] == ["actors/rl.py:1", "actors/training.py:1",
                                                     "actors/evaluation.py:1"]
    assert "(learner.core -> learner.distributed -> deepspeed)" in problems[0]
    assert "(learner.distributed -> deepspeed)" in problems[1]


def test_type_checking_imports_count_for_the_layers_not_for_deepspeed():
    """A TYPE_CHECKING import never runs (so it loads no DeepSpeed), but it still makes the bottom layer
    depend on an upper layer's types: those types belong in posterrl/."""
    problems = _violations({
        "posterrl/experience.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from rollout.worker import RolloutGroup\n",
        "actors/rl.py": "import typing\nif typing.TYPE_CHECKING:\n    from learner.core import StepStats\n",
    })
    assert len(problems) == 1
    assert problems[0].startswith("posterrl/experience.py:3: `from rollout.worker import RolloutGroup` "
                                  "(under TYPE_CHECKING): posterrl/ is the bottom layer")


def test_relative_imports_are_resolved():
    stmts = parse_imports("from . import sampler\nfrom .sampler import sample\n", "rollout.worker")
    assert stmts[0].targets == ("rollout", "rollout.sampler")
    assert stmts[1].targets == ("rollout.sampler", "rollout.sampler.sample")
    assert parse_imports("from ..batch import collate\n", "posterrl.data.sheet")[0].targets[0] == "posterrl.batch"
    assert parse_imports("from .base import Task\n", "learner.tasks", is_package=True)[0].targets[0] == \
        "learner.tasks.base"


# (d) Every blocking wait on actors in actors/ has a time limit (cluster.call_timeout_s, or the reason for
# another one beside it), so a hung or dead actor stops the run with a message instead of hanging it.


def untimed_waits(source: str) -> list[int]:
    """Lines of `ray.get(...)` / `ray.wait(...)` calls without a timeout= keyword."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "wait")
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"
                and not any(k.arg == "timeout" for k in node.keywords)):
            lines.append(node.lineno)
    return lines


def test_untimed_waits_are_found():
    assert untimed_waits("import ray\nray.get(x)\nray.wait(y, timeout=3)\nray.wait(z, num_returns=2)\n") == [2, 4]


def test_every_wait_in_actors_has_a_timeout():
    found = {str(path.relative_to(ROOT)): untimed_waits(path.read_text())
             for path in sorted((ROOT / "actors").rglob("*.py"))}
    assert {path: lines for path, lines in found.items() if lines} == {}
