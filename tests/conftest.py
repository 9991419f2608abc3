import pytest

from .distributed import BACKEND

WORLD_SIZES = [1, 2, 4]


def pytest_collection_modifyitems(config, items):
    """Under NCCL, skip world sizes larger than the number of GPUs here."""
    if BACKEND != "nccl":
        return
    import torch

    gpus = torch.cuda.device_count()
    for item in items:
        callspec = getattr(item, "callspec", None)
        world = callspec.params.get("world_size") if callspec else None
        if world is not None and world > gpus:
            item.add_marker(pytest.mark.skip(reason=f"world size {world} needs {world} GPUs, {gpus} here"))
