"""The README's backend x feature table, generated from the adapters' ``capabilities`` and ``limits``.

    python tests/capability_table.py README.md    # rewrite the table between its markers
``tests/test_layers.py`` checks the README holds what this generates.
"""

from __future__ import annotations

import sys
from pathlib import Path

from implicit_updates.adapters import adapter_classes
from implicit_updates.adapters.base import capability_table

ORDER = ["HookedTransformer", "toy", "Hugging Face", "TransformerBridge", "nnsight"]
START, END = "<!-- --8<-- [start:capabilities] -->\n", "<!-- --8<-- [end:capabilities] -->"


def markdown() -> str:
    classes = adapter_classes()
    return capability_table({name: classes[name] for name in ORDER})


def table_in(text: str) -> str:
    return text[text.index(START) + len(START):text.index(END)].strip("\n") + "\n"


def rewrite(text: str) -> str:
    return text[:text.index(START) + len(START)] + "\n" + markdown() + "\n" + text[text.index(END):]


if __name__ == "__main__":
    path = Path(sys.argv[1])
    path.write_text(rewrite(path.read_text()))
    print(f"wrote the capability table into {path}")
