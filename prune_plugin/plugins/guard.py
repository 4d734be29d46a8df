"""The collapse guard as a hook implementation: after each edit, score a fixed sample of natural sentences and
act when perplexity exceeds `prune_guard_factor` times the pre-edit baseline (warn, stop, or roll back)."""
from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Sequence

from ..hookspecs import hookimpl
from ..perplexity import mean_perplexity

if TYPE_CHECKING:
    from ..session import EditSession, EditStep

LOG = logging.getLogger("prune_plugin")


class CollapseWarning(UserWarning):
    """An edit pushed the collapse perplexity past the configured multiple of its baseline."""


def guard_sample(sentences: Sequence[str], size: int) -> list[str]:
    """`size` sentences spread evenly over the corpus (deterministic, so every edit is scored on the same set)."""
    if size >= len(sentences):
        return list(sentences)
    stride = len(sentences) / size
    return [sentences[int(i * stride)] for i in range(size)]


class CollapseGuard:
    def __init__(self) -> None:
        self.sample: list[str] = []
        self.baseline: float | None = None

    @hookimpl
    def prune_edit_start(self, session: "EditSession") -> None:
        from ..datasets import default_reference_corpus_path, load_reference_sentences

        cfg = session.config
        if session.tokenizer is None:
            raise ValueError("prune_guard needs the model's tokenizer (pass tokenizer= to the edit session)")
        corpus = load_reference_sentences(cfg.prune_guard_corpus or default_reference_corpus_path())
        self.sample = guard_sample(corpus, cfg.prune_guard_sentences)
        self.baseline = mean_perplexity(session.model, session.tokenizer, self.sample, cfg.prune_guard_batch_size)
        LOG.info("collapse guard: baseline perplexity %.3f on %d sentences", self.baseline, len(self.sample))

    @hookimpl
    def prune_after_edit(self, session: "EditSession", step: "EditStep") -> None:
        cfg = session.config
        with session.timed(step, "guard"):
            ppl = mean_perplexity(session.model, session.tokenizer, self.sample, cfg.prune_guard_batch_size)
        step.perplexity = ppl
        ratio = ppl / self.baseline if self.baseline else float("inf")
        if ratio <= cfg.prune_guard_factor:  # NaN fails this test, so a NaN perplexity counts as a collapse
            return
        action = cfg.prune_guard
        decision = {"step": step.index, "perplexity": ppl, "baseline": self.baseline, "ratio": ratio,
                    "factor": cfg.prune_guard_factor, "action": action}
        step.decisions.append(decision)
        message = (f"collapse guard: edit {step.index} raised perplexity to {ppl:.4g} "
                   f"({ratio:.3g}x the baseline {self.baseline:.4g}, limit {cfg.prune_guard_factor:g}x): {action}")
        LOG.warning(message)
        if action == "warn":
            warnings.warn(message, CollapseWarning, stacklevel=2)
        elif action == "stop":
            step.stop = True
        elif action == "rollback":
            session.rollback(step)
            decision["perplexity_after_rollback"] = mean_perplexity(
                session.model, session.tokenizer, self.sample, cfg.prune_guard_batch_size)
