"""Preference dataset: JSONL of ``prompt``/``chosen``/``rejected`` for the FPO stage (docs/methods.md §5).

    ds = PreferenceDataset("pref.jsonl", tokenizer, seq_len=512)
    item = ds[0]  # chosen_tokens/labels/loss_mask [s], rejected_tokens/labels/loss_mask [s], sample_id

Each side is encoded exactly like an SFT sample (``megatron_fusion.data.sft``): segments
``[(prompt, False), (chosen|rejected, True)]``, BOS first, EOS last and counted as a response
token, ``labels[t] = tokens[t+1]``, ``loss_mask`` 1 where ``labels[t]`` is a response token.
The overflow and empty rules apply per pair: if either side is rejected/skipped, the pair is.
"""

from __future__ import annotations

from megatron_fusion.data.jsonl import JSONLError, read_jsonl
from megatron_fusion.data.sft import DatasetStats, EncodedSample, _TokenizedJSONL, pack
from megatron_fusion.data.packing import sample_slots


class PreferenceDataset(_TokenizedJSONL):
    """Pairs ``(prompt, chosen, rejected)`` -> chosen and rejected tensors of the SFT layout."""

    kind = "pref"

    def _build(self) -> None:
        stats = DatasetStats()
        pairs: list[tuple[EncodedSample, EncodedSample]] = []
        fields = ("prompt", "chosen", "rejected")
        for sample_id, (line_no, rec) in enumerate(
                read_jsonl(self.path, required=fields, str_fields=fields)):
            stats.records += 1
            sides = []
            for side in ("chosen", "rejected"):
                segs = [s for s in ((rec["prompt"], False), (rec[side], True)) if s[0]]
                if not self._check_empty(segs, line_no, stats, what=side):
                    break
                enc = self._encode(segs, sample_id, line_no, stats)
                if enc is None:
                    break
                sides.append(enc)
            if len(sides) != 2:
                continue
            stats.truncated += any(s.truncated for s in sides)
            stats.kept += 1
            stats.tokens += sum(len(s.ids) for s in sides)
            stats.response_tokens += sum(int(s.is_response[1:].sum()) for s in sides)
            pairs.append((sides[0], sides[1]))
        self.pairs, self.stats = pairs, stats

    def _get_state(self) -> dict:
        return {"pairs": self.pairs, "stats": self.stats}

    def _set_state(self, state: dict) -> None:
        self.pairs, self.stats = state["pairs"], state["stats"]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        chosen, rejected = self.pairs[i]
        out = {"sample_id": chosen.sample_id}
        for prefix, s in (("chosen", chosen), ("rejected", rejected)):
            for k, v in pack(s.ids, s.is_response, self.seq_len, self.pad_id).items():
                out[f"{prefix}_{k}"] = v
            out[f"{prefix}_length"] = sample_slots(len(s.ids), self.seq_len)  # packed slots
        return out

    def pair(self, i: int) -> tuple[EncodedSample, EncodedSample]:
        """The unpadded (chosen, rejected) encodings of item ``i``."""
        return self.pairs[i]

    @property
    def sample_ids(self) -> list[int]:
        return [c.sample_id for c, _ in self.pairs]


__all__ = ["PreferenceDataset", "JSONLError"]
