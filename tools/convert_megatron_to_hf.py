"""Convert a Megatron run dir (or one of its checkpoints) back into a Hugging Face model dir.

    python tools/convert_megatron_to_hf.py --megatron RUN_DIR --out HF_DIR [--arch ... --dtype bfloat16]

Reads checkpoints of either layer spec (TE or local names, meta.json's layer_spec). Writes
safetensors shards, config.json and the tokenizer files. The body is ``megatron-fusion convert megatron-to-hf`` (megatron_fusion/cli.py); this file is a thin wrapper.
"""

import sys

from megatron_fusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['convert', 'megatron-to-hf', *sys.argv[1:]]))
