"""unipeft: parameter-efficient fine-tuning as points in He et al.'s unified design space.

    import unipeft
    peft = unipeft.attach(model, "lora")      # wrap, freeze, activate
    print(peft.summary())
"""

from unipeft.core.adapted import Peft, attach, handle
from unipeft.core.io import load_adapter, save_adapter
from unipeft.core.pretrained import from_pretrained
from unipeft.core.recipe import DeltaSpec, Recipe, builtin_recipe_names, load_recipe

__version__ = "0.1.0"

__all__ = ["Peft", "attach", "handle", "load_adapter", "save_adapter", "from_pretrained", "Recipe", "DeltaSpec",
           "load_recipe", "builtin_recipe_names", "__version__"]
