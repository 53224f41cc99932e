"""unipeft: parameter-efficient fine-tuning as points in He et al.'s unified design space.

    import unipeft
    peft = unipeft.attach(model, "lora")      # wrap, freeze, activate
    print(peft.summary())
"""

import unipeft.methods  # noqa: F401  (importing the methods registers every form with the core)
from unipeft._version import __version__
from unipeft.core.adapted import handle
from unipeft.core.recipe import DeltaSpec, Recipe, builtin_recipe_names, load_recipe
from unipeft.interop.pretrained import from_pretrained
from unipeft.peft import Peft, attach
from unipeft.persist.io import load_adapter, save_adapter

__all__ = ["Peft", "attach", "handle", "load_adapter", "save_adapter", "from_pretrained", "Recipe", "DeltaSpec",
           "load_recipe", "builtin_recipe_names", "__version__"]
