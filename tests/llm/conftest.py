"""A real OpenAI-compatible server with a small instruction-tuned model, once per session.

By default: ``dasllama-server`` over SmolLM2-135M-Instruct as ``scripts/install_test_llm.py``
installs it (scripts/test.sh runs that and stops if it fails; outside CI the tests skip,
quoting its error, when it is missing; under CI they fail). ``LLM_TEST_BASE_URL`` (and
``LLM_TEST_MODEL``) point them at another server instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from support import skip_unless_installed

from examples.local_llm import LocalLLMServer, ModelNotInstalled


@pytest.fixture(scope="session")
def llm_endpoint() -> Iterator[tuple[str, str]]:
    """(base URL ending in /v1, model id) of a running server."""
    external = os.environ.get("LLM_TEST_BASE_URL")
    if external:
        model = os.environ.get("LLM_TEST_MODEL")
        if not model:
            pytest.fail("LLM_TEST_BASE_URL is set: set LLM_TEST_MODEL to the model id too")
        yield external, model
        return
    try:
        server = LocalLLMServer.from_manifest()
    except ModelNotInstalled as exc:
        skip_unless_installed(exc)
    with server:
        yield server.base_url, server.model_id
