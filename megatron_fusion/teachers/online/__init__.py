"""Online teachers: teacher ranks beside the student stream aligned top-K to it (methods.md §1, §6, §7).

    megatron-fusion train --config configs/demo/tiny_online.yaml   # student + teacher ranks

One torchrun world, split by ``megatron_fusion.parallel.init_distributed(online_teachers=...)``
into ``[student ranks..., teacher 0 ranks..., ...]``; each part has its own default process
group, so the student's Megatron state and checkpoints see only the student, and a teacher's
ranks see only their group: ``init_student_groups(tp=teacher.tp)`` there builds the teacher's
TP group and the teacher backend runs unchanged (``server.build_backend``): ``backend: megatron``
(a megatron-fusion run, sharded at the teacher's TP) or ``backend: hf`` (a transformers model;
not tensor-parallel, so at ``tp > 1`` every rank holds the full model and keeps its vocab shard of
the logits). Why the split rather than one Megatron state over all ranks: ``parallel.py``.

Teacher loop (``server.run_teacher``): from the student's data position (its latest checkpoint's
``consumed`` on resume, else 0) it walks the same ``SampleOrder`` through the same step slicing
as the student (``data.order.step_microbatch_indices``); each teacher DP replica serves the student DP ranks
``d`` with ``d % replicas == replica``. Per micro-batch all TP ranks of the replica run
``compute_batch_topk`` (distributed top-K over the teacher's vocab shards, alignment to pivot
positions), and TP rank 0 sends the result to every student rank of the last pipeline stage of
that DP rank. Gloo sends complete only when the student posts the matching receive, so the
teacher keeps at most ``fuse.prefetch`` micro-batches computed ahead and then waits.

Message per micro-batch (bridge group, point-to-point, tag = teacher index): a header int64[8]
``[status, b, s, K, msg_len, fingerprint, teacher_tokens, compute_us]``, then the top-K log-probs
[b, s, K] as the uint16 codes of a format-4 shard (int16 bits), ids [b, s, K] int32, aligned
[b, s] uint8, teacher CE [b] float32 (nats per byte of response text, methods.md §2) and (d, c)
[b, s, 2] float32: what a format-4 shard stores, decoded as a shard is read, so both paths give
the same tensors (``protocol.decode_topk``, methods.md §6). Never a full-vocabulary tensor. A teacher
that raises posts its message in the launch's store (read by a student whose receive fails) and
sends ``status = ERROR`` with the message; a teacher that dies closes its connections; one that
hangs trips ``fuse.timeout_s``: each ends the student's run with an error naming the teacher.
A fingerprint that does not match the student's micro-batch is a ``TeacherDataError``.

Modules: ``protocol`` (the message format, fingerprints, who receives what), ``client`` (the
student side: ``OnlineTeacher``, a teacher source of the fuse stage), ``server`` (the teacher
loop on the teacher ranks).
"""
