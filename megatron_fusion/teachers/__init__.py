"""Everything that produces the student's targets from frozen teachers (methods.md §1, §6, §7).

- ``backends``: frozen models that give (vocab-sharded) logits: HF, Megatron, vocab-sharded.
- ``align``: pivot <-> teacher token alignment.
- ``topk``: a teacher's standardised top-K at the pivot's positions, for one batch.
- ``shards``: the checked on-disk format of top-K shards and source log-prob files.
- ``precompute``: offline top-K over a dataset, resumable; ``source_logprobs``: FPO's source scores.
- ``offline`` / ``online``: the fuse stage's teacher sources (shards on disk, teacher ranks).
- ``vocab_match`` / ``logprobs``: the hybrid loss's inputs: teacher id -> pivot id for tokens with
  the same surface text, and a teacher's exact top-K log-probs (methods.md §9).

Nothing here imports the stages or the trainer (tools/check_imports.py).
"""
