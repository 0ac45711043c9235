"""The Ray Serve application (imports Ray; the core package does not)."""

from halldyll_ray.serve.app import AppArgs, build_app, with_options

__all__ = ["AppArgs", "build_app", "with_options"]
