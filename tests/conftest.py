"""Test-session setup that must happen before anything imports triton.

Without a GPU, our Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1), which
reads the variable when triton is first imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

LONG_PROMPT_TOKENS = 3000  # "several thousand": many KDA chunks, 24 MLA blocks of 128
LONG_NEW_TOKENS = 3


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The builder's tiny Kimi Linear (float32), shared by the engine test modules."""
    from vllm_kimi_linear.tools.builder import build_tiny_checkpoint
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "kimi-linear-tiny")


@pytest.fixture(scope="session")
def reference_model(tiny_model_dir):
    from tests.reference import kimi_linear_ref as ref
    return ref.load(tiny_model_dir)


@pytest.fixture(scope="session")
def long_prompt_expected(reference_model):
    """(ids, greedy new tokens, prompt logprobs) of one long prompt by the independent reference
    in one piece; computed once per session (each reference forward takes seconds)."""
    from tests.engine_util import prompt
    from tests.reference import kimi_linear_ref as ref
    ids = prompt(LONG_PROMPT_TOKENS, salt=99)
    return (ids, ref.greedy_generate(reference_model, ids, LONG_NEW_TOKENS),
            ref.prompt_logprobs(reference_model, ids))


@pytest.fixture(autouse=True)
def nothing_held_after(request):
    """In the engine modules (their tests take the module's `llm`): once a test ends, every KDA
    slot and MLA block is free again."""
    if "llm" not in request.fixturenames:
        yield
        return
    llm = request.getfixturevalue("llm")
    yield
    from tests.engine_util import assert_nothing_held
    assert_nothing_held(llm)
