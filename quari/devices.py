"""Where computation runs: the one rule that turns a configured device into a torch device, and
the wait that a timing needs before it reads the clock."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None): CUDA when a GPU is visible, else the CPU; any other name (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``) or device as torch spells it."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously); nothing on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
