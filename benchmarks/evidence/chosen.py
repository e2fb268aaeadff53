"""The value a finished study's search chose for one method's key, for the next study to build on
(the ViT study's second stage, the CIFAR-10 efficiency study's baselines).

    python benchmarks/evidence/chosen.py STUDY_DIR METHOD SECTION.KEY     e.g.  ... sgd optim.lr

prints the value of SECTION.KEY in METHOD's chosen grid point, as the grid wrote it (``0.0003``,
``[0.005,0.01]``), read from STUDY_DIR/search.json (what ``otmdr compare`` writes after its
search). A study without that file, a method that searched no grid, or a chosen point that does not
set the key is one line on stderr and exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def chosen_value(study: Path, method: str, key: str) -> str:
    """The value; ValueError with the reason when there is none."""
    path = study / "search.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: run the study's search first")
    labels = {r["setting"] for r in json.loads(path.read_text()) if r["method"] == method and r["chosen"]}
    if len(labels) != 1:
        raise ValueError(f"{path}: {method} has {'no' if not labels else 'more than one'} chosen grid point")
    # a point's label is its overrides without their section ("lr=0.0003 weight_decay=0.005"), and
    # no value holds a space (the grid's values are numbers and bracketed lists)
    name = key.split(".", 1)[-1]
    found = [token.split("=", 1)[1] for token in labels.pop().split() if token.split("=", 1)[0] == name]
    if not found:
        raise ValueError(f"{path}: the point chosen for {method} does not set {key}")
    return found[0]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: chosen.py STUDY_DIR METHOD SECTION.KEY", file=sys.stderr)
        return 2
    try:
        print(chosen_value(Path(argv[0]), argv[1], argv[2]))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
