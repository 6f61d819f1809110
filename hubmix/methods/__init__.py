"""Merge methods: importing this package registers every built-in method."""

from . import arithmetic, basic, task_vectors  # noqa: F401  (register the methods)
from hubmix.methods.registry import REGISTRY, Method, Param, get_method, methods, register

__all__ = ["REGISTRY", "Method", "Param", "get_method", "methods", "register"]
