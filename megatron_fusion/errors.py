"""Which exceptions are the user's to fix (printed as one line) rather than bugs (traceback)."""

from __future__ import annotations


def user_facing(e: BaseException) -> bool:
    from megatron_fusion.checkpoint import CheckpointError

    kinds: list[type] = [CheckpointError, FileNotFoundError]
    try:
        from megatron_fusion.data.jsonl import JSONLError

        kinds.append(JSONLError)
    except ImportError:
        pass
    try:
        from megatron_fusion.topk_store import TopKStoreError  # type: ignore[attr-defined]

        kinds.append(TopKStoreError)
    except ImportError:
        pass
    from megatron_fusion.stages.fuse import TeacherDataError

    kinds.append(TeacherDataError)
    from megatron_fusion.stages.fpo import SourceLogprobError

    kinds.append(SourceLogprobError)
    return isinstance(e, tuple(kinds))
