import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The default model, loaded once for every slow test here (the analyses leave it as it was)."""
    from zeropoint.models.load import load_model

    return load_model(None, progress=False)
