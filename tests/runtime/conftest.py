import pytest

from tests.models.llm_support import ByteTokenizer, tiny_gemma3


@pytest.fixture(scope="module")
def lm():
    """The tiny Gemma 3 over byte tokens that the LM serving tests drive (a module's own `lm` overrides it)."""
    return tiny_gemma3(vocab=ByteTokenizer.vocab)
