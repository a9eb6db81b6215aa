"""Demos of megatron-fusion (not part of the installed package; run from the repository root).

    python -m demos.real     # make demo: SmolLM2-135M fused with Gemma-3-270M, then FPO
    python -m demos.tiny     # make demo-tiny: random-init teachers trained here, CI-sized
    python -m demos.data     # the tiny recipes' data (runs/demo_data; also made on first use)
    python -m demos.fusion_experiment   # SFT vs ULD vs ULD + GLD from one init (docs/experiments.md)
    python -m demos.fusion_experiment --world real   # real teachers, real text, bits per byte
"""
