from __future__ import annotations

import pytest

from checkpoints import ARCHS, build_checkpoint


def pytest_addoption(parser):
    parser.addoption("--spec-distribution-samples", type=int, default=1500,
                     help="Samples a side in the speculative-decoding chi-square test (the full test: 20000).")


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Build each tiny architecture once per session: ``checkpoint_factory("qwen2") -> Path``."""
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = build_checkpoint(arch, tmp_path_factory.mktemp(f"ckpt-{arch}"))
        return built[arch]
    return get


@pytest.fixture(scope="session")
def llama_dir(checkpoint_factory):
    return checkpoint_factory("llama")


@pytest.fixture(params=ARCHS)
def arch_dir(request, checkpoint_factory):
    return checkpoint_factory(request.param)


@pytest.fixture
def procs():
    """Processes a test starts (anything with ``stop()``), stopped in reverse order afterwards."""
    started: list = []
    yield started
    for p in reversed(started):
        p.stop()
