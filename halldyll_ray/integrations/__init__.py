"""Adapters that plug halldyll-ray into agent frameworks, each behind an optional extra.

- :mod:`halldyll_ray.integrations.langgraph`: a LangGraph ``BaseStore`` over the HTTP API
  (``pip install 'halldyll-ray[langgraph]'``).

Importing this package imports no framework; each submodule raises an ``ImportError`` that
names its extra when the framework is missing.
"""
