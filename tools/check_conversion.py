"""Compare an HF model with its Megatron conversion: same random tokens, max |logit diff|.

    python tools/check_conversion.py --hf HF_DIR --megatron MEG_DIR [--tp 2 --pp 2] [--tol 1e-4]

The last line is ``max_abs_logit_diff <value>``; exit code 1 above the tolerance. Megatron runs
on tp*pp local gloo ranks (CPU), in the spec the trainer builds here; a checkpoint of either
layer spec loads into it. The body is ``megatron-fusion convert check`` (megatron_fusion/cli.py); this file is a thin wrapper.
"""

import sys

from megatron_fusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['convert', 'check', *sys.argv[1:]]))
