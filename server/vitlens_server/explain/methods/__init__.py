"""Explanation methods: importing this package imports every module in it, registering them all.

Each module registers its methods in `METHODS` with `register_method`; adding a method is adding
a module here.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
