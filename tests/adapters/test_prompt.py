"""Soft-prompt files: PEFT prompt tuning and p-tuning load; bad files are refused naming the problem."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from server.adapters.prompt import load_prompt
from server.errors import AdapterFormatError
from tests.conftest import FIXTURES

SOURCE = FIXTURES / "peft" / "tiny-llama" / "prompt-16"


def _copy(tmp_path: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    folder = tmp_path / "prompt"
    shutil.copytree(SOURCE, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if tensors is not None:
        save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def test_prompt_tuning_fixture_loads():
    adapter = load_prompt(SOURCE, hidden=256)
    assert adapter.n_virtual == 16 and adapter.embeddings.shape == (16, 256)
    assert adapter.size_bytes == 16 * 256 * 4


def test_p_tuning_saved_embeddings_load(tmp_path):
    """PEFT saves p-tuning's encoder output as `prompt_embeddings`: served the same way."""
    emb = torch.randn(16, 256)
    folder = _copy(tmp_path, {"peft_type": "P_TUNING", "encoder_hidden_size": 64}, {"prompt_embeddings": emb})
    assert torch.equal(load_prompt(folder, hidden=256).embeddings, emb)


@pytest.mark.parametrize("config,tensors,field", [
    ({"token_dim": 128}, None, "token_dim"),
    ({"num_virtual_tokens": 0}, None, "num_virtual_tokens"),
    ({"num_virtual_tokens": 8}, None, "prompt_embeddings"),
    ({"peft_type": "PREFIX_TUNING"}, None, "peft_type"),
    ({"num_transformer_submodules": 2}, None, "num_transformer_submodules"),
    ({}, {"other": torch.zeros(16, 256)}, "prompt_embeddings"),
    ({}, {"prompt_embeddings": torch.zeros(16, 256), "extra": torch.zeros(1)}, "extra"),
    ({}, {"prompt_embeddings": torch.full((16, 256), float("nan"))}, "prompt_embeddings"),
])
def test_bad_prompt_files_refused(tmp_path, config, tensors, field):
    with pytest.raises(AdapterFormatError) as err:
        load_prompt(_copy(tmp_path, config, tensors), hidden=256)
    assert err.value.field == field
