"""Merge methods: importing this package registers every built-in method."""

from . import basic, arithmetic, task_vectors  # noqa: F401, I001  (register the methods; the seed's first)
from hubmix.methods.registry import REGISTRY, Method, Param, get_method, methods, register

__all__ = ["REGISTRY", "Method", "Param", "get_method", "methods", "register"]
