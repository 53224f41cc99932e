"""``unipeft methods``: the built-in recipes."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from unipeft.cli.common import table

if TYPE_CHECKING:
    from unipeft.core.recipe import Recipe


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("methods", help="list the built-in PEFT recipes",
                              description="The built-in recipes: name, family (Xu & Xie's taxonomy), paper, default "
                                          "positions and a description.")
    p.set_defaults(run=run)


def positions(recipe: Recipe) -> str:
    """The positions (or module patterns) a recipe places deltas at, in order, without repeats."""
    found: list[str] = []
    for spec in recipe.deltas:
        names = list(spec.positions) or [f"modules:{spec.modules}"]
        found += [n for n in names if n not in found]
    if recipe.train_base:
        found.append("all weights")
    return ",".join(found)


def run(args: argparse.Namespace) -> int:
    from unipeft.core.recipe import builtin_recipe_names, load_recipe

    rows = []
    for name in builtin_recipe_names():
        recipe = load_recipe(name)
        rows.append((name, recipe.family, recipe.paper, positions(recipe), recipe.description))
    print(table(rows, header=("name", "family", "paper", "positions", "description")))
    return 0
