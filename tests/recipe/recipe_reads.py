"""Which recipe fields the package reads: a static scan of its source (no pytest here, so other tests can use it).

The schema is walked from the pydantic models into sections (`rollout`, `algorithm.loss`, `data.train[]`, ...). The
source of every module is then scanned for reads of a field *on an expression that denotes that section*: an
attribute chain from the recipe (`self.recipe.rollout.n`, a parameter annotated `Recipe`), a local bound to a section
(`e = self.recipe.eval; e.n`, `d, m = ...`, `for s in r.data.train: s.weight`), or a parameter of a function the
section is passed to (`self._load_source(s)` -> `cfg.path`; bindings are followed to a fixed point, across modules by
function name). So `rollout.n` and `eval.n` are told apart, and a field of the same name read on another section does
not count. Two reads cover a whole section: `model_dump()` of a section other than the whole recipe (its fields flow
on as keyword arguments, e.g. `RewardSpec(**cfg.model_dump())`), and a section's own method defined in
`vlm_sapo/recipe.py` (`loss.hparams()`), which reads what its body reads. `vlm_sapo/recipe.py` is otherwise not
scanned: a validator that checks a field is not a use of it, and dumping the whole recipe (the metrics config, the
checkpoint) reads nothing.
"""

from __future__ import annotations

import ast
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

Path_ = tuple[str, ...]  # a section: () is the recipe, ("data", "train[]") an item of data.train


def _models_in(annotation: Any) -> tuple[list[type[BaseModel]], bool]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation], False
    if origin is list:
        inner, _ = _models_in(args[0]) if args else ([], False)
        return inner, True
    if origin in (typing.Union, types.UnionType):
        found = [_models_in(a) for a in args]
        return [m for ms, _ in found for m in ms], any(in_list for _, in_list in found)
    return [], False


def sections(model: type[BaseModel], path: Path_ = ()) -> dict[Path_, type[BaseModel]]:
    out = {path: model}
    for name, field in model.model_fields.items():
        models, in_list = _models_in(field.annotation)
        for m in models:
            out.update(sections(m, (*path, f"{name}[]" if in_list else name)))
    return out


def dotted(path: Path_, field: str | None = None) -> str:
    return ".".join((*path, field) if field else path)


def leaf_fields(tree: dict[Path_, type[BaseModel]]) -> list[tuple[Path_, str]]:
    """Every (section, field) holding a value rather than a section."""
    out = []
    for path, model in tree.items():
        for name, field in model.model_fields.items():
            if not _models_in(field.annotation)[0]:
                out.append((path, name))
    return out


class _Value(typing.NamedTuple):
    path: Path_
    is_list: bool = False  # the list of sections itself (items: path with "[]")


class ReadScanner:
    def __init__(self, root_model: type[BaseModel], package: Path, recipe_module: Path):
        self.tree = sections(root_model)
        self.by_class: dict[str, set[Path_]] = {}
        for path, model in self.tree.items():  # an annotation may name the class or any of its bases
            for cls in model.__mro__:
                if issubclass(cls, BaseModel) and cls.model_fields:
                    self.by_class.setdefault(cls.__name__, set()).add(path)
        self.reads: set[tuple[Path_, str]] = set()
        self.where: dict[tuple[Path_, str], str] = {}
        self.bindings: dict[str, dict[str, set[_Value]]] = {}  # function name -> param -> values
        self.methods = self._section_methods(ast.parse(recipe_module.read_text()))
        self.functions: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []
        for file in sorted(package.rglob("*.py")):
            if file.resolve() == recipe_module.resolve():
                continue
            tree = ast.parse(file.read_text(), filename=str(file))
            rel = str(file.relative_to(package.parent))
            self.functions += [(rel, node) for node in ast.walk(tree)
                               if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
            self.functions.append((rel, ast.FunctionDef(name="<module>", args=ast.arguments(
                posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
                body=[n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)], decorator_list=[],
                lineno=1)))

    # ---------------------------------------------------------------------------------------- section methods
    def _section_methods(self, module: ast.Module) -> dict[tuple[str, str], set[str] | None]:
        """(class, method) -> fields its body reads on `self` (None: all, through `self.model_dump`)."""
        out: dict[tuple[str, str], set[str] | None] = {}
        for cls in (n for n in module.body if isinstance(n, ast.ClassDef) and n.name in self.by_class):
            model = next(m for p, m in self.tree.items() if cls.name in {c.__name__ for c in m.__mro__})
            for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
                if fn.decorator_list:  # validators run inside pydantic, they are not uses
                    continue
                fields: set[str] | None = set()
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                            and node.func.attr == "model_dump" and _is_self(node.func.value):
                        excluded = _excluded(node)
                        fields = set(model.model_fields) - excluded
                        break
                    if isinstance(node, ast.Attribute) and _is_self(node.value) and node.attr in model.model_fields:
                        fields.add(node.attr)
                out[(cls.name, fn.name)] = fields
        return out

    # ---------------------------------------------------------------------------------------- resolution
    def _child(self, value: _Value, attr: str) -> _Value | None:
        if value.is_list:
            return None
        model = self.tree[value.path]
        if attr not in model.model_fields:
            return None
        models, in_list = _models_in(model.model_fields[attr].annotation)
        if not models:
            return None
        return _Value((*value.path, f"{attr}[]"), True) if in_list else _Value((*value.path, attr))

    def resolve(self, node: ast.AST, env: dict[str, set[_Value]]) -> set[_Value]:
        if isinstance(node, ast.Name):
            return set(env.get(node.id, ()))
        if isinstance(node, ast.Attribute):
            if node.attr == "recipe":  # self.recipe, trainer.recipe
                return {_Value(())}
            return {c for v in self.resolve(node.value, env) if (c := self._child(v, node.attr)) is not None}
        if isinstance(node, ast.Subscript):
            return {_Value(v.path) for v in self.resolve(node.value, env) if v.is_list}
        if isinstance(node, ast.IfExp):
            return self.resolve(node.body, env) | self.resolve(node.orelse, env)
        if isinstance(node, ast.BoolOp):
            return set().union(*(self.resolve(v, env) for v in node.values))
        return set()

    def _items(self, node: ast.AST, env: dict[str, set[_Value]]) -> tuple[set[_Value], bool]:
        """Values of the items of an iterable (and whether it is `enumerate(...)`)."""
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "enumerate" \
                and node.args:
            return self._items(node.args[0], env)[0], True
        return {_Value(v.path) for v in self.resolve(node, env) if v.is_list}, False

    def _bind(self, target: ast.AST, values: set[_Value], env: dict[str, set[_Value]]) -> bool:
        if isinstance(target, ast.Name) and values and not values <= env.get(target.id, set()):
            env.setdefault(target.id, set()).update(values)
            return True
        return False

    def _env(self, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, set[_Value]]:
        env: dict[str, set[_Value]] = {}
        args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]
        for a in args:
            ann = a.annotation
            name = ann.id if isinstance(ann, ast.Name) else ann.value if isinstance(ann, ast.Constant) else None
            if isinstance(name, str) and name in self.by_class:
                env[a.arg] = {_Value(p) for p in self.by_class[name]}
            if a.arg in self.bindings.get(fn.name, {}):
                env.setdefault(a.arg, set()).update(self.bindings[fn.name][a.arg])
        changed = True
        while changed:  # flow-insensitive: every binding anywhere in the function, to a fixed point
            changed = False
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign | ast.AnnAssign):
                    value = node.value
                    if value is None:
                        continue
                    for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                            for t, v in zip(target.elts, value.elts):
                                changed |= self._bind(t, self.resolve(v, env), env)
                        else:
                            changed |= self._bind(target, self.resolve(value, env), env)
                elif isinstance(node, ast.For):
                    items, enumerated = self._items(node.iter, env)
                    target = node.target
                    if enumerated and isinstance(target, ast.Tuple) and len(target.elts) == 2:
                        target = target.elts[1]
                    changed |= self._bind(target, items, env)
        return env

    # ---------------------------------------------------------------------------------------- reads
    def _read(self, path: Path_, name: str, where: str) -> None:
        self.reads.add((path, name))
        self.where.setdefault((path, name), where)

    def _scan(self, rel: str, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
        return self._visit(rel, fn, self._env(fn), top=True)

    def _visit(self, rel: str, node: ast.AST, env: dict[str, set[_Value]], top: bool = False) -> bool:
        """Reads in `node`'s subtree; a comprehension's targets are bound in its own scope only."""
        changed = False
        if isinstance(node, ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp):
            env = {k: set(v) for k, v in env.items()}
            for gen in node.generators:
                items, enumerated = self._items(gen.iter, env)
                target = gen.target
                if enumerated and isinstance(target, ast.Tuple) and len(target.elts) == 2:
                    target = target.elts[1]
                if isinstance(target, ast.Name):
                    env[target.id] = items
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and not top:
            env = {**env}  # a closure sees the enclosing bindings (it is also scanned on its own)
        changed |= self._reads_at(rel, node, env)
        for child in ast.iter_child_nodes(node):
            changed |= self._visit(rel, child, env)
        return changed

    def _reads_at(self, rel: str, node: ast.AST, env: dict[str, set[_Value]]) -> bool:
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute):
            for v in self.resolve(node.value, env):
                if not v.is_list and node.attr in self.tree[v.path].model_fields:
                    self._read(v.path, node.attr, where)
        if not isinstance(node, ast.Call):
            return False
        func = node.func
        if isinstance(func, ast.Name) and func.id == "getattr" and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant):
            for v in self.resolve(node.args[0], env):
                if not v.is_list and node.args[1].value in self.tree[v.path].model_fields:
                    self._read(v.path, node.args[1].value, where)
        if isinstance(func, ast.Attribute):
            for v in self.resolve(func.value, env):
                if v.is_list:
                    continue
                model = self.tree[v.path]
                if func.attr == "model_dump" and v.path:
                    for name in set(model.model_fields) - _excluded(node):
                        self._read(v.path, name, where)
                fields = self.methods.get((model.__name__, func.attr), set())
                for name in model.model_fields if fields is None else fields:
                    self._read(v.path, name, where)
        callee = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        return bool(callee) and self._bind_call(callee, node, env, is_method=isinstance(func, ast.Attribute))

    def _bind_call(self, callee: str, call: ast.Call, env: dict[str, set[_Value]], is_method: bool) -> bool:
        changed = False
        for _, fn in self.functions:
            if fn.name != callee:
                continue
            params = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args)]
            if is_method and params and params[0] in ("self", "cls"):
                params = params[1:]
            pairs = list(zip(params, call.args)) + [(k.arg, k.value) for k in call.keywords if k.arg]
            for param, arg in pairs:
                values = self.resolve(arg, env)
                slot = self.bindings.setdefault(callee, {}).setdefault(param, set())
                if values and not values <= slot:
                    slot.update(values)
                    changed = True
        return changed

    def run(self) -> set[tuple[Path_, str]]:
        while any([self._scan(rel, fn) for rel, fn in self.functions]):
            pass
        return self.reads


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _excluded(call: ast.Call) -> set[str]:
    for k in call.keywords:
        if k.arg == "exclude" and isinstance(k.value, ast.Set | ast.List | ast.Tuple):
            return {e.value for e in k.value.elts if isinstance(e, ast.Constant)}
    return set()


def unread_fields(root_model: type[BaseModel], package: Path, recipe_module: Path) -> list[str]:
    scanner = ReadScanner(root_model, package, recipe_module)
    reads = scanner.run()
    return [dotted(p, f) for p, f in leaf_fields(scanner.tree) if (p, f) not in reads]
