"""distil fit-head: a headless encoder gets an MLM head on its frozen encoder, and can then teach with soft targets."""

import json

import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertModel

from distil.cli import main
from distil.config import load_config
from distil.training.loop import train
from train_fixtures import prepared_data, teacher_dir, write_recipe


def test_fit_head_raises_masked_accuracy_and_keeps_the_encoder(tmp_path):
    base = teacher_dir(tmp_path, "bert")
    headless = tmp_path / "headless"
    BertModel.from_pretrained(base).save_pretrained(headless)
    AutoTokenizer.from_pretrained(base).save_pretrained(headless)
    data = prepared_data(tmp_path, base)
    assert main(["fit-head", str(headless), "--data", str(data), "-o", str(tmp_path / "fitted"), "--steps", "80",
                 "--lr", "1e-2", "--batch-size", "16"]) == 0
    record = json.loads((tmp_path / "fitted" / "fit_head.json").read_text())
    # A random head scores about 0; chance over the 91 words is 1.1%: the fitted head is well above both.
    assert record["after"]["masked_accuracy"] > max(record["before"]["masked_accuracy"], 1 / 91) * 3, record
    assert record["after"]["mlm_loss"] < 0.7 * record["before"]["mlm_loss"]
    fitted, info = AutoModelForMaskedLM.from_pretrained(tmp_path / "fitted", output_loading_info=True)
    assert not info["missing_keys"]
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    with torch.no_grad():
        original = AutoModel.from_pretrained(headless).eval()(ids).last_hidden_state
        kept = fitted.eval().base_model(ids).last_hidden_state
    assert torch.equal(original, kept)  # the encoder is exactly the teacher's
    # The fitted teacher can now teach with soft targets (a headless one is refused for alpha_ce).
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "fitted", data, tmp_path / "run", optim={"max_steps": 2})
    assert train(load_config(recipe))["steps"] == 2
