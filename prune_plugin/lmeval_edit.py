"""The hardedit tasks' token-level requests and scoring: CounterFact's score as ROME's evaluation code computes it,
and EasyEdit's teacher-forced token accuracy, from ordinary lm-eval log-likelihood requests.

- ROME (compute_rewrite_quality_counterfact) scores each prompt's continuation " answer" by its mean negative
  log-likelihood per answer token and counts the prompt as a success when the preferred answer's is lower.
  lm-eval returns the total log-likelihood of a continuation; the number of its tokens comes from the tokenizer
  (with lm-eval's own encoding, so it is the number lm-eval scored).
- EasyEdit (test_prediction_acc, behind compute_edit_quality's rewrite_acc / rephrase_acc) runs the model once on
  tok(prompt + " " + answer), takes the prompt's token count n = len(tok(prompt)), and reports the share of
  positions k >= n where the argmax of the logits at k - 1 is token k. Each such position is one lm-eval request
  whose context encodes to tokens [:k] and whose continuation is token k: lm-eval's `is_greedy` is exactly "argmax
  = token k". Which strings give those tokens is found with the tokenizer and checked with lm-eval's own
  encoding code, so a tokenizer that cannot be split this way is an error, not a silent difference.

Both need the model's tokenizer when the dataset is built (lm-eval's model arguments name it; see lmeval_ppl).
"""
from __future__ import annotations

from typing import Any, Sequence

from prune_plugin.lmeval_ppl import _HFLMEncoding


def lm_eval_encoding(tokenizer: Any, add_bos_token: bool | None) -> _HFLMEncoding:
    """lm-eval's HF encoding methods around `tokenizer`, with the model's add_bos_token setting."""
    return _HFLMEncoding(tokenizer, add_bos_token)


def continuation_length(encoding: _HFLMEncoding, prompt: str, answer: str) -> int:
    """How many tokens lm-eval scores for the request (prompt, " " + answer)."""
    _, continuation = encoding.encode_pair(prompt, " " + answer)
    return len(continuation)


def token_pieces(encoding: _HFLMEncoding, prompt: str, answer: str) -> list[list[str]]:
    """[context, continuation] for every answer position EasyEdit scores, in order (see the module docstring)."""
    text = prompt + " " + answer
    whole = encoding.tok_encode(text)
    start = len(encoding.tok_encode(prompt))
    if start >= len(whole):
        raise ValueError(f"{text!r} has no token after the prompt's {start} tokens")
    cuts = _cuts(encoding.tokenizer, text)
    pieces = []
    for k in range(start, len(whole)):
        piece = _piece_for(encoding, text, whole, k, cuts)
        if piece is None:
            token = encoding.tokenizer.convert_ids_to_tokens(whole[k : k + 1])[0]
            raise ValueError(f"token {k} ({token!r}) of {text!r} is not a text span lm-eval can score on its own "
                             "(e.g. the token before it is whitespace only, which lm-eval moves into the "
                             "continuation), so EasyEdit's token accuracy cannot be reproduced through lm-eval "
                             "for this tokenizer")
        pieces.append(piece)
    return pieces


def _cuts(tokenizer: Any, text: str) -> list[int]:
    """Character offsets where tokens may start or end: the fast tokenizer's offsets, else every offset."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cuts = {c for pair in offsets for c in pair}
        cuts |= {c - 1 for c in cuts if c > 0} | {c + 1 for c in cuts if c < len(text)}  # spaces on either side
        return sorted(c for c in cuts | {len(text)} if 0 < c <= len(text))
    return list(range(1, len(text) + 1))


def _piece_for(encoding: _HFLMEncoding, text: str, whole: Sequence[int], k: int, cuts: Sequence[int]):
    prefix, target = list(whole[:k]), [whole[k]]
    for begin in cuts:
        if begin >= len(text):
            break
        if encoding.tok_encode(text[:begin].rstrip() or text[:begin]) != prefix:
            continue
        # Every end, not only up to the first span of two tokens: a span one character short of a word can be two
        # tokens (SmolLM2: " Zealan" is " Zeal" + "an") where the whole word (" Zealand") is one.
        for end in (c for c in cuts if c > begin):
            context, continuation = encoding.encode_pair(text[:begin], text[begin:end])
            if context == prefix and continuation == target:
                return [text[:begin], text[begin:end]]
    return None


def counterfact_scores(lls: Sequence[float], lengths: Sequence[int], chars: Sequence[int]) -> dict[str, int]:
    """One prompt's comparison of the preferred answer (index 0) with the other (index 1).

    acc: ROME's, mean NLL per token strictly lower for the preferred answer; acc_total: total log-likelihood
    (lm-eval's multiple-choice acc: argmax, ties to the first); acc_norm: per character (lm-eval's acc_norm).
    """
    mean_nll = [-ll / n for ll, n in zip(lls, lengths)]
    per_char = [ll / c for ll, c in zip(lls, chars)]
    return {"acc": int(mean_nll[0] < mean_nll[1]), "acc_total": int(lls[0] >= lls[1]),
            "acc_norm": int(per_char[0] >= per_char[1])}
