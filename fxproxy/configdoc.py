"""The README's configuration table, generated from the settings models so it cannot drift."""

from __future__ import annotations

from pydantic_settings import BaseSettings

from fxproxy.config import describe_default
from shared.settings import CommonSettings, EdgeSettings, IngestorSettings, SimfeedSettings

SECTIONS: list[tuple[str, type[BaseSettings], frozenset[str]]] = [
    ("all processes", CommonSettings, frozenset()),
    ("edge", EdgeSettings, frozenset(CommonSettings.model_fields)),
    ("ingestor", IngestorSettings, frozenset(CommonSettings.model_fields)),
    ("simfeed", SimfeedSettings, frozenset(CommonSettings.model_fields)),
]


def config_table() -> str:
    rows = ["| process | env var / flag | default | meaning |", "|---|---|---|---|"]
    for section, model, skip in SECTIONS:
        for name, field in model.model_fields.items():
            if name in skip:
                continue
            flag = "--" + name.replace("_", "-")
            default = describe_default(field).replace("|", "\\|")
            rows.append(f"| {section} | `FXPROXY_{name.upper()}` `{flag}` | `{default}` | "
                        f"{field.description} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(config_table(), end="")
