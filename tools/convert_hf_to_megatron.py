"""Convert a Hugging Face Llama (incl. 3.x) / Mistral / Qwen2 / Qwen3 / Phi-3 model into a Megatron run dir.

    python tools/convert_hf_to_megatron.py --hf HF_DIR --out MEG_DIR [--tp 2 --pp 2] [--spec te|local]

then train from it with ``checkpoint.load=MEG_DIR`` at that TP. ``--spec``: the layer spec whose
parameter names the checkpoint is written in (default: te when Transformer Engine imports on a
GPU here, else local); either loads into a model of either spec. The body is ``megatron-fusion convert hf-to-megatron`` (megatron_fusion/cli.py); this file is a thin wrapper.
"""

import sys

from megatron_fusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['convert', 'hf-to-megatron', *sys.argv[1:]]))
