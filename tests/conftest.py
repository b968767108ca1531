"""Shared fixtures. Every test runs with outbound network connections refused (in this process and,
through PYTHONPATH, in every Python subprocess and papermill kernel it starts), and with the
synthetic-world cache in a temporary folder shared by the session."""
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as `diffret` does: idle torch threads must not spin against other processes
sys.path.insert(0, str(HERE / "netguard"))
import sitecustomize  # noqa: E402,F401  (installs the guard in this process)

os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE / "netguard"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory):
    "A session-wide cache folder for rendered synthetic worlds (DIFFRET_CACHE)."
    d = tmp_path_factory.mktemp("diffret_cache")
    old = os.environ.get("DIFFRET_CACHE")
    os.environ["DIFFRET_CACHE"] = str(d)
    yield d
    if old is None: os.environ.pop("DIFFRET_CACHE", None)
    else: os.environ["DIFFRET_CACHE"] = old


def shared_data(*parts) -> Path:
    "A path inside ../shared/data, or skip the test with the reason when it is absent."
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists(): pytest.skip(f"real reference data not found at {p} (../shared/data beside the repository)")
    return p


@pytest.fixture(scope="module")
def one_thread():
    "One torch thread for a module of tiny-tensor tests: threads gain nothing there, and on a shared machine their hand-offs can cost more than the work."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def batch():
    "Four captions and 4-frame 48 px clips with ragged frame masks: a batch for the tiny retrieval models (baselines, DITS)."
    import torch
    from diffusionret_nb.clip import tokenize
    torch.manual_seed(0)
    tok, wm = tokenize(["a red circle moves left", "a blue square grows", "a star appears", "two dots"], 16)
    fm = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]]).bool()
    return dict(tokens=tok, word_mask=wm, frames=torch.randn(4, 4, 3, 48, 48), frame_mask=fm)
