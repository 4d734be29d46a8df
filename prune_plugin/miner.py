"""Hard-case miner: apply each CounterFact-form record as a single edit on fresh weights, measure how far it
moves the collapse perplexity, restore the weights bit-exactly, and rank the records by that jump."""
from __future__ import annotations

import logging
from pathlib import Path
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


def mine_to_folder(*, method: str = "ROME", model: str | None = None, hparams: str | None = None,
                   data: str | None = None, limit: int | None = None, sentences: int = 20, threshold: float = 1.5,
                   out: str = "mined") -> dict[str, Any]:
    """``prune-plugin mine``: load the model and its EasyEdit hparams (the shipped YAML for `method` on the
    embedded SmolLM2 by default), mine the first `limit` records of `data` (the shipped hard cases by default) on
    `sentences` reference sentences, and write ``ranked.json`` (every record, hardest first) and
    ``hardedit.json`` (those at `threshold` or more) into `out`. Returns the records and the paths written."""
    from .datasets import load_edit_records, load_reference_sentences, write_json
    from .easyedit.covariance import prepare_statistics
    from .easyedit.driver import build_editor, easyeditor_module, load_hparams, shipped_hparams
    from .models import load_model
    from .plugins.guard import guard_sample

    easyeditor_module()
    records = load_edit_records(data)[:limit]
    lm, tok = load_model(model)
    loaded = load_hparams(hparams or shipped_hparams(method))
    corpus = load_reference_sentences()
    prepare_statistics(lm, tok, loaded, corpus)  # MEMIT's covariance, as the main job does
    editor = build_editor(loaded, lm, tok)
    mined = mine_hard_cases(editor, records, guard_sample(corpus, sentences))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    hard = hard_subset(mined, threshold)
    return {"mined": mined, "hard": hard, "ranked_path": write_json(folder / "ranked.json", mined),
            "hard_path": write_json(folder / "hardedit.json", hard)}
