"""Merge methods: importing this package registers every built-in method."""

from . import basic  # noqa: F401  (registers the methods)
from hubmix.methods.registry import REGISTRY, Method, Param, get_method, methods, register

__all__ = ["REGISTRY", "Method", "Param", "get_method", "methods", "register"]
