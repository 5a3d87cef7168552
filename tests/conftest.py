from __future__ import annotations

import pytest

from checkpoints import ARCHS, build_checkpoint


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
