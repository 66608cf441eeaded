"""The shared build pipeline (see :mod:`plugtron.pipeline.build` for the order)."""

from plugtron.pipeline.build import BuildReport, BuiltModel, build_model, build_with_builder

__all__ = ["BuildReport", "BuiltModel", "build_model", "build_with_builder"]
