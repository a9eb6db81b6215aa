"""Score each preference pair's chosen and rejected response with one source model (docs/methods.md §5).

    python tools/precompute_source_logprobs.py --data pref.jsonl --source-model src/ \
        --source-name s0 --out runs/logp/s0 --seq-len 2048

Same backend flags as tools/precompute_teacher_topk.py (``--backend``, ``--checkpoint``,
``--gguf-file``, ``--device cuda|cuda:N|cpu``, ``--dtype auto|bf16|fp16|fp32``).
Resumable like tools/precompute_teacher_topk.py. The body is ``megatron-fusion precompute-logprobs`` (megatron_fusion/cli.py); this file is a thin wrapper.
"""

import sys

from megatron_fusion.cli import main

if __name__ == "__main__":
    sys.exit(main(['precompute-logprobs', *sys.argv[1:]]))
