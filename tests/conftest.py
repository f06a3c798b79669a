"""Fixtures shared by more than one test file."""

from dataclasses import replace

import pytest
import torch

from arpg import ARPG, ARPG_PRESETS


@pytest.fixture
def meta_arpg(monkeypatch):
    """A small tiny-shaped ARPG in training mode (with token dropout) on the meta device, and a batch
    of 2 token rows (2, 16) and labels (2,) there. The meta device, like CUDA, refuses to mix with
    CPU tensors, so a tensor made without device= fails here as it would on a GPU. Meta tensors
    hold shapes but no values, so the model's input checks, which read values, are switched off."""
    for check in ("_check_tokens", "_check_labels", "_check_order"):
        monkeypatch.setattr(ARPG, check, lambda *args: None)
    config = replace(ARPG_PRESETS["tiny"], vocab_size=64, block_size=16, dim=64, token_dropout_p=0.1)
    with torch.device("meta"):
        model = ARPG(config).train()
        tokens, labels = torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    return model, tokens, labels
