"""Checkpoints we write load anywhere through the Auto classes; bad checkpoints fail naming the tensor."""

import json
import shutil

import pytest
import torch
from dsv3.convert.checkpoint import install_remote_code
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM

from tests.conftest import run_python

RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
ids = torch.tensor([[5, 9, 17, 33, 65]])
print(type(m).__module__.split('.')[0], repr(m(ids).logits.sum().item()))
"""


def test_official_layout_loads_with_zero_missing_and_unexpected(tiny_ckpt):
    path = tiny_ckpt("v3")
    model, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert any(k.startswith("model.layers.3.shared_head.") for k in index["weight_map"])  # MTP on disk
    assert set(index["weight_map"]) == set(model.state_dict())


def test_checkpoint_round_trips_through_auto_classes_in_a_fresh_process(tiny_ckpt, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt("v3"), trust_remote_code=True, dtype=torch.float32)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(saved, moved)  # a different folder: nothing may point back at the source tree
    config = json.loads((moved / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_deepseek.DeepseekV3ForCausalLM"
    assert (moved / "modeling_deepseek.py").is_file() and (moved / "configuration_deepseek.py").is_file()
    module, value = run_python(RELOAD, str(moved)).split()
    assert module == "transformers_modules"  # the copied remote code, not our installed package
    with torch.no_grad():
        expect = model(torch.tensor([[5, 9, 17, 33, 65]])).logits.sum().item()
    assert abs(float(value) - expect) < 1e-3
    base = AutoModel.from_pretrained(moved, trust_remote_code=True)
    assert type(base).__name__ == "DeepseekV3Model"


def _rewrite_tensor(folder, name, fn):
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / index["weight_map"][name]
    tensors = load_file(shard)
    result = fn(tensors[name])
    if result is None:
        del tensors[name], index["weight_map"][name]
        index_path.write_text(json.dumps(index))
    else:
        tensors[name] = result
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "damage, kind", [(lambda t: None, "missing"), (lambda t: t[:-1].clone(), "misshaped")]
)
def test_missing_or_misshaped_tensor_is_an_error_naming_it(tiny_ckpt, tmp_path, damage, kind):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt("v3"), bad)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    _rewrite_tensor(bad, name, damage)
    with pytest.raises(ValueError, match=f"{kind} tensor.*{name.replace('.', '[.]')}"):
        AutoModelForCausalLM.from_pretrained(bad, trust_remote_code=True)


def test_mtp_layer_can_be_dropped_explicitly(tiny_ckpt):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_ckpt("v3"), trust_remote_code=True, num_nextn_predict_layers=0
    )
    assert len(model.model.layers) == model.config.num_hidden_layers


BROKEN_HUB_CODE = (
    "from transformers.utils.import_utils import is_torch_fx_available  # gone in transformers 5\n"
)


def test_install_code_makes_an_official_download_loadable_and_keeps_backups(tiny_ckpt, tmp_path):
    official = tmp_path / "DeepSeek-V3"
    shutil.copytree(tiny_ckpt("v3"), official)
    (official / "modeling_deepseek.py").write_text(BROKEN_HUB_CODE)  # what the Hub repo ships
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises for the broken import
        AutoModelForCausalLM.from_pretrained(official, trust_remote_code=True)
    original_config = (official / "config.json").read_text()
    install_remote_code(official)
    assert (official / "modeling_deepseek.py.orig").read_text() == BROKEN_HUB_CODE
    # The official config already names the same auto_map classes: it is left as is, so nothing to back up.
    assert (official / "config.json").read_text() == original_config
    assert not (official / "config.json.orig").exists()
    install_remote_code(official)  # idempotent: the first backup (the original) is never overwritten
    assert (official / "modeling_deepseek.py.orig").read_text() == BROKEN_HUB_CODE
    module, _ = run_python(RELOAD, str(official)).split()
    assert module == "transformers_modules"
