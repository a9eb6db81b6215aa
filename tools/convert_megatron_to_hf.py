"""Convert a Megatron run dir (or one of its checkpoints) back into a Hugging Face model dir.

    python tools/convert_megatron_to_hf.py --megatron RUN_DIR --out HF_DIR [--arch ... --dtype bfloat16]

Reads checkpoints of either layer spec (TE or local names, meta.json's layer_spec). Writes
safetensors shards, config.json and the tokenizer files. Logic: megatron_fusion/convert.py.
"""

import sys

from megatron_fusion.convert import megatron_to_hf_cli

if __name__ == "__main__":
    sys.exit(megatron_to_hf_cli())
