import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import os  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# No per-example deadline: a loaded 2-core CI machine must not turn slow examples into
# failures. In CI (CI=true) examples are derandomized, so a run is repeatable; local runs
# keep exploring new examples.
settings.register_profile("local", deadline=None, print_blob=True)
settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "local")


@pytest.fixture(params=["numpy", "cupy"], scope="session")
def backend(request):
    """A function moving a NumPy array to the backend under test ("numpy" or "cupy").

    The same tests run on both; the cupy case is skipped without a GPU. The
    function carries ``.name`` ("numpy" / "cupy") and ``.device`` ("cpu" / "cuda").
    """
    from minipeft.backend import gpu_available, to_device  # noqa: PLC0415

    if request.param == "cupy" and not gpu_available():
        pytest.skip("no GPU / CuPy not installed")
    device = "cpu" if request.param == "numpy" else "cuda"

    def to_backend(array):
        return to_device(array, device)

    to_backend.name = request.param
    to_backend.device = device
    return to_backend
