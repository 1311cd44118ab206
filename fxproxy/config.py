"""Every settings field becomes a documented command-line flag; bad values fail in one line."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import SecretStr, ValidationError
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


class ConfigError(Exception):
    pass


def describe_default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, SecretStr):
        return "set" if value.get_secret_value() else "empty"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def add_settings_flags(parser: argparse.ArgumentParser, model: type[BaseSettings],
                       skip: frozenset[str] = frozenset()) -> None:
    group = parser.add_argument_group("settings (flag, or env var FXPROXY_NAME)")
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        group.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
            metavar=name.split("_")[-1].upper(),
            help=f"{field.description} [FXPROXY_{name.upper()}; default: {describe_default(field)}]",
        )
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="env-style file of FXPROXY_* settings, read before the environment")


def unknown_settings(environ: Mapping[str, str], models: Iterable[type[BaseSettings]]) -> list[str]:
    """FXPROXY_* names in `environ` that no settings model reads, each with the likeliest meant.

    pydantic-settings ignores them (one ConfigMap serves every role), so a misspelt setting
    would otherwise leave its default in force without a word.
    """
    known = sorted({f"FXPROXY_{name.upper()}" for model in models for name in model.model_fields})
    out = []
    for name in sorted(n for n in environ if n.startswith("FXPROXY_") and n not in known):
        close = difflib.get_close_matches(name, known, n=1)
        out.append(f"{name} is not an fxproxy setting" + (f" (did you mean {close[0]}?)" if close else ""))
    return out


def load_settings(model: type[S], args: argparse.Namespace, **overrides: Any) -> S:
    values = {k: v for k, v in vars(args).items() if k in model.model_fields}
    values.update(overrides)
    try:
        return model(_env_file=getattr(args, "config", None), **values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            if not err["loc"]:  # settings that cannot work together: the message names them
                problems.append(err["msg"].removeprefix("Value error, "))
                continue
            name = str(err["loc"][0])
            problems.append(f"{name} (FXPROXY_{name.upper()}): {err['msg'].removeprefix('Value error, ')}")
        raise ConfigError("bad configuration: " + "; ".join(problems)) from None
