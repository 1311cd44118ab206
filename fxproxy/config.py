"""Every settings field becomes a documented command-line flag; bad values fail in one line."""

from __future__ import annotations

import argparse
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
