"""Moved to :mod:`algodock.cache` (the step cache is a package of its own); kept so existing imports work."""

from algodock.cache.store_cache import *  # noqa: F403
from algodock.cache.store_cache import __all__  # noqa: F401
