"""The method catalogue: one file per functional form, each registering itself with ``register_form``.

Importing this package imports every module in it, so a new method is one new file here (plus its recipe YAML).
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
