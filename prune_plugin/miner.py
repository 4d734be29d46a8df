"""Hard-case miner: apply each CounterFact-form record as a single edit on fresh weights, measure how far it
moves the collapse perplexity, restore the weights bit-exactly, and rank the records by that jump."""
from __future__ import annotations

import logging
from typing import Any, Sequence

from tqdm import tqdm

from .config import PruneConfig
from .originals import OriginalWeights, fingerprint
from .perplexity import mean_perplexity

LOG = logging.getLogger("prune_plugin")


def mine_hard_cases(
    editor: Any, records: Sequence[dict], sentences: Sequence[str], *, batch_size: int = 10
) -> list[dict]:
    """Records with ``ppl_before``, ``ppl_after`` and ``ppl_ratio`` added, hardest (largest ratio) first.

    `editor` is an EasyEdit BaseEditor whose hparams leave the plugin off; its model is restored after every
    record, and a parameter outside the method's targets that changes is an error (nothing is silently lost).
    """
    from .easyedit.driver import edit_sequentially
    from .easyedit.editor import target_parameters

    model, tok = editor.model, editor.tok
    targets = target_parameters(model, editor.hparams, PruneConfig())
    originals = OriginalWeights()
    originals.record(model, targets)
    others = {n: fingerprint(p) for n, p in model.named_parameters() if n not in originals}
    baseline = mean_perplexity(model, tok, sentences, batch_size)
    mined = []
    for record in tqdm(records, desc="mining", unit="edit"):
        try:
            edit_sequentially(editor, [record])
            after = mean_perplexity(model, tok, sentences, batch_size)
        finally:
            originals.restore(model)
        moved = [n for n, p in model.named_parameters() if n in others and fingerprint(p) != others[n]]
        if moved:
            raise RuntimeError(f"the edit of record {record.get('case_id')} changed {moved[0]}, outside the method's "
                               "targets; it cannot be restored")
        ratio = after / baseline if baseline else float("inf")
        mined.append({**record, "ppl_before": baseline, "ppl_after": after,
                      "ppl_ratio": ratio if ratio == ratio else float("inf")})  # NaN perplexity ranks as hardest
    mined.sort(key=lambda r: r["ppl_ratio"], reverse=True)
    return mined


def hard_subset(mined: Sequence[dict], threshold: float) -> list[dict]:
    """The records whose perplexity ratio reached `threshold`, in HardEdit (CounterFact) form with fresh case_ids."""
    keep = ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
            "locality_ground_truth", "relation")
    return [{"case_id": i, **{k: r[k] for k in keep if k in r}} for i, r in
            enumerate(r for r in mined if r["ppl_ratio"] >= threshold)]

