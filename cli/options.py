"""Click options generated from the config dataclasses of ``pipeline/configs.py``, and ``--config FILE``.

A config field becomes one option: its name is ``--field-name`` (or the field's ``flag``), its type and
default come from the field, its help from the field's metadata. The command then rebuilds the frozen config
from the parsed values (``ConfigOptions.build``), so no default is written twice.

``--config FILE`` takes the resolved config a run saved beside its output (``config.json``): its settings
become the command's defaults, so the command alone replays that run, and any option given on the command
line still wins.

Importing this module imports neither torch nor h5py (``--help`` stays instant).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import click

from emotion_attention.cache.errors import ConfigError
from emotion_attention.cli.common import UserErrorCommand, split_classes
from emotion_attention.pipeline.core.stage import read_resolved_config


# -- option types named by a field's ``kind`` (a registry, not branches) ----------------------------------
class FramesType(click.ParamType):
    """'all' -> 0 (every present frame); a positive integer -> that many sampled frames."""
    name = "all|N"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text == "all":
            return 0
        if not text.isdigit() or int(text) < 1:
            self.fail(f"{value!r}: use 'all' or a positive number of frames such as 16", param, ctx)
        return int(text)


class NamesType(click.ParamType):
    """'a,b,c' -> ("a", "b", "c")."""
    name = "A,B,..."

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            return tuple(value)
        return tuple(v.strip() for v in str(value).split(",") if v.strip())


class ClassesType(click.ParamType):
    """--classes 'A,B,C': a class order; refuses duplicates and a value that names no class."""
    name = "A,B,..."

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            value = ",".join(value)
        return split_classes(value)


class FoldsType(click.ParamType):
    """'all' (or empty) -> () = every fold; '1,3' -> (1, 3)."""
    name = "all|K,K"

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            return tuple(int(v) for v in value)
        text = str(value).strip().lower()
        if text in ("", "all"):
            return ()
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r}: use 'all' or fold numbers such as 1,3", param, ctx)


KINDS: dict[str, click.ParamType] = {"frames": FramesType(), "names": NamesType(), "classes": ClassesType(),
                                     "folds": FoldsType()}
TEXT_KINDS = {"frames": lambda v: "all" if v == 0 else str(v), "names": ",".join, "classes": ",".join,
              "folds": lambda v: ",".join(map(str, v)) or "all",  # cv: () is every fold
              "fold_list": lambda v: ",".join(map(str, v))}       # ablate: () is no fold (the split protocol)


# -- one generated option ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bound:
    """A click parameter tied to a place in the resolved config: ``record[*key][*path]``."""
    param: str            # click's parameter name
    key: tuple            # where the resolved config holds the config: ("config",) or () for its root
    path: tuple           # the field path inside it, e.g. ("face", "size")
    kind: Optional[str] = None


def _base_type(hint) -> type:
    """Optional[int] -> int; tuple[...] -> tuple."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        hint = args[0]
    return typing.get_origin(hint) or hint


class ConfigOptions:
    """The options of one config class (nested configs flattened), and the config built back from them.

    >>> from emotion_attention.pipeline.configs import EvalConfig
    >>> opts = ConfigOptions(EvalConfig)
    >>> @click.command()
    ... @opts
    ... def cmd(**params):
    ...     print(opts.build(params))
    >>> cmd(["--frames", "16", "--split", "Test"], standalone_mode=False)
    EvalConfig(frames=16, seed=0, view=0, device='auto', split='Test', fold=None, explain=False)
    """

    def __init__(self, cls, key: tuple = ("config",), skip: Sequence[str] = (), usage_error: bool = False):
        self.cls, self.key, self.skip, self.usage_error = cls, tuple(key), set(skip), usage_error
        self.bounds: list[Bound] = []
        self._options: list[tuple[list, dict]] = []  # (declarations, keyword arguments) of click.option
        self._walk(cls, ())

    def _walk(self, cls, prefix: tuple) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if not meta.get("cli", True) or f.name in self.skip:
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                self._walk(hints[f.name], prefix + (f.name,))
                continue
            default = f.default_factory() if f.default is MISSING else f.default
            self._options.append(self._option(f.name, _base_type(hints[f.name]), default, meta))
            self.bounds.append(Bound(f.name, self.key, prefix + (f.name,), meta.get("kind")))

    @staticmethod
    def _option(name: str, base: type, default: Any, meta) -> tuple[list, dict]:
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        decls = list(flag) if isinstance(flag, tuple) else [flag]
        kwargs: dict = {"default": default, "help": meta.get("help") or None,
                        "show_default": default not in (None, "")}
        if base is bool:
            kwargs["is_flag"] = True
            if "/" not in decls[0] and not meta.get("flag"):
                decls = [f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}"]
        elif meta.get("kind"):
            kwargs["type"] = KINDS[meta["kind"]]
            if isinstance(default, tuple):
                kwargs["default"] = TEXT_KINDS[meta["kind"]](default)
            elif meta["kind"] == "frames":
                kwargs["default"] = TEXT_KINDS["frames"](default)
        elif meta.get("choices"):
            shown = ["none" if c is None else str(c) for c in meta["choices"]]
            kwargs["type"] = click.Choice(shown)
            none = None in meta["choices"]  # "none" on the command line is the field's None
            if default is None and not none:  # unset: filled in later (a recipe), as the help says
                kwargs["default"], kwargs["show_default"] = None, False
            else:
                kwargs["default"], kwargs["show_default"] = ("none" if default is None else str(default)), True
            cast = base if base in (int, float) else str
            kwargs["callback"] = lambda ctx, param, value: None if value is None or (none and value == "none") \
                else cast(value)
        else:
            kwargs["type"] = base if base in (int, float, str) else str
        return decls + [name], kwargs

    def __call__(self, fn: Callable) -> Callable:
        """Add the options to a click command (before or after ``@click.command``)."""
        for decls, kwargs in reversed(self._options):
            fn = click.option(*decls, **kwargs)(fn)
        return fn

    def build(self, params: dict, **fixed):
        """Pop this config's values from ``params`` (click's keyword arguments) and build the config;
        ``fixed`` gives fields set by the command itself (e.g. folds resolved against the store)."""
        values = {b.path: params.pop(b.param) for b in self.bounds if b.param in params}
        try:
            return _build(self.cls, values, (), fixed)
        except ConfigError as exc:
            if self.usage_error:  # click's usage error (exit 2) instead of the one-line UserError (exit 1)
                raise click.UsageError(str(exc)) from exc
            raise


def _build(cls, values: dict, prefix: tuple, fixed: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = prefix + (f.name,)
        if not prefix and f.name in fixed:
            kwargs[f.name] = fixed[f.name]
        elif dataclasses.is_dataclass(hints[f.name]) and any(p[:len(path)] == path for p in values):
            kwargs[f.name] = _build(hints[f.name], values, path, {})
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs)


# -- stage commands: --config FILE, --quiet ------------------------------------------------------------------
class StageCommand(UserErrorCommand):
    """A command that runs one stage: ``--config FILE`` replays a saved run; a UserError is one line."""

    def __init__(self, *args, stage: str, bounds: Sequence[Bound] = (), sources: Optional[dict] = None,
                 replays: Sequence[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.stage, self.bounds, self.sources = stage, list(bounds), dict(sources or {})
        self.replays = (stage, *replays)  # the stages whose saved configs this command takes
        self.params.insert(0, click.Option(
            ["--config", "config_file"], type=click.Path(exists=True, dir_okay=False, path_type=Path),
            is_eager=True, expose_value=False, callback=self._replay,
            help="A config.json a run of this command saved beside its output: its settings (and inputs) become"
                 " the defaults; options given here still win."))

    def _replay(self, ctx: click.Context, param, path: Optional[Path]) -> None:
        if path is None:
            return
        record = read_resolved_config(path, self.replays)
        defaults = dict(ctx.default_map or {})
        choices = {p.name for p in self.params if isinstance(p.type, click.Choice)}
        for bound in self.bounds:
            value = _dig(record, bound.key + bound.path)
            if value is None:
                continue
            if bound.kind in TEXT_KINDS:
                value = TEXT_KINDS[bound.kind](value)
            elif bound.param in choices:
                value = str(value)
            defaults[bound.param] = value
        for param_name, source in self.sources.items():  # arguments: the run's inputs and output
            value = _dig(record, source)
            if value is not None:
                defaults[param_name] = value
        ctx.default_map = defaults


def _dig(record, path: Sequence):
    for step in path:
        if isinstance(record, dict) and step in record:
            record = record[step]
        elif isinstance(record, list) and isinstance(step, int) and step < len(record):
            record = record[step]
        else:
            return None
    return record


def stage_command(name: str, stage: str, *configs: ConfigOptions, sources: Optional[dict] = None,
                  extra: Sequence[Bound] = (), **kwargs):
    """``@click.command`` for a stage: the configs' options, ``--config FILE`` and ``--quiet``.

    Arguments:
        name: the command's name.
        stage: the stage name recorded in the resolved configs it replays.
        configs: ConfigOptions whose options the command takes.
        sources: click parameter -> where the resolved config holds its value, e.g. {"data": ("inputs", 0),
            "out": ("out",)}.
        extra: Bounds of hand-shaped options, so ``--config`` replays them too.
    """
    def decorate(fn):
        for opts in reversed(configs):
            fn = opts(fn)
        fn = click.option("--quiet", is_flag=True, default=False, help="No progress bar.")(fn)
        bounds = [b for opts in configs for b in opts.bounds] + list(extra)
        return click.command(name, cls=StageCommand, stage=stage, bounds=bounds, sources=sources, **kwargs)(fn)
    return decorate
