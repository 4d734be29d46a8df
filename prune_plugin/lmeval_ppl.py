"""Make lm-eval score a sentence exactly as the Butterfly paper's collapse metric does.

The paper tokenizes each sentence with add_special_tokens=False and no BOS, so its first token is context only
and every later token is scored; lm-eval's loglikelihood_rolling prepends a prefix token and scores the first
token too. The exact route through lm-eval is a `loglikelihood` request whose context is the text of the first
token and whose continuation is the rest of the sentence: lm-eval then feeds precisely the paper's token ids and
sums the log-probabilities of tokens 2..n. A per-sentence perplexity also needs the number of scored tokens,
which no lm-eval request returns, so the task resolves the model's tokenizer (lm-eval's RULER convention: the
`tokenizer` or `pretrained` model argument, which lm-eval merges into task metadata) and records the count.

Exactness is checked, not assumed: each split is re-encoded with lm-eval's own HFLM encoding methods and must
give back the paper's ids, else the sentence is rejected with the reason (e.g. a tokenizer that adds BOS by
default needs add_bos_token=False, which the paper also implies).
"""
from __future__ import annotations

import itertools
from typing import Any, Sequence

from .switches import parse_switch as parse_bool  # metadata flags: the package's one on/off parser

_IN_MEMORY_PREFIX = "prune-plugin-in-memory-tokenizer:"
_in_memory: dict[str, Any] = {}
_counter = itertools.count()


def register_tokenizer(tokenizer: Any) -> str:
    """A metadata handle for a tokenizer object (lm-eval metadata must stay plain data), see evaluate()."""
    handle = f"{_IN_MEMORY_PREFIX}{next(_counter)}"
    _in_memory[handle] = tokenizer
    return handle


def unregister_tokenizer(handle: str) -> None:
    _in_memory.pop(handle, None)


class MissingTokenizerError(ValueError):
    """The task metadata names no tokenizer (no model argument lm-eval passes on identifies one)."""


def resolve_tokenizer(metadata: dict[str, Any],
                      needed_for: str = "collapse_ppl_paper needs the model's tokenizer to count scored tokens") -> Any:
    """The tokenizer lm-eval's model will use, from task metadata (model args merged with --metadata).

    The model arguments of lm-eval's backends that name it: `tokenizer` (sglang: `tokenizer_path`), else the model
    itself (`model` for the API backends such as local-completions, `pretrained` for hf, vllm and sglang);
    `revision`, or vllm's `tokenizer_revision`; hf's `use_fast_tokenizer` or vllm's `tokenizer_mode` (auto or
    slow).
    """
    name = next((metadata[k] for k in ("tokenizer", "tokenizer_path", "model", "pretrained")
                 if isinstance(metadata.get(k), str) and metadata[k]), None)
    if name is None:
        raise MissingTokenizerError(
            f"{needed_for}: run it with --model hf (or vllm) --model_args pretrained=<path> (or add "
            "tokenizer=<path> to --model_args or --metadata)"
        )
    if name.startswith(_IN_MEMORY_PREFIX):
        if name not in _in_memory:
            raise ValueError(f"tokenizer handle {name!r} is no longer registered")
        return _in_memory[name]
    from transformers import AutoTokenizer

    # The same keyword arguments the backend gives AutoTokenizer, so both sides tokenize alike.
    use_fast = parse_bool(metadata.get("use_fast_tokenizer", True))
    mode = metadata.get("tokenizer_mode")
    if mode is not None:  # vllm: "auto" (fast when there is one) or "slow"
        if str(mode).strip().lower() not in ("auto", "slow"):
            raise ValueError(
                f"tokenizer_mode={mode!r}: collapse_ppl_paper reproduces Hugging Face tokenizers only "
                "(tokenizer_mode auto or slow)"
            )
        use_fast = str(mode).strip().lower() == "auto"
    kwargs: dict[str, Any] = {
        "revision": metadata.get("tokenizer_revision") or metadata.get("revision") or "main",
        "trust_remote_code": parse_bool(metadata.get("trust_remote_code")) or False,
        "use_fast": use_fast,
    }
    add_bos = parse_bool(metadata.get("add_bos_token"))
    if add_bos is not None:
        kwargs["add_bos_token"] = add_bos
    if metadata.get("subfolder"):
        kwargs["subfolder"] = metadata["subfolder"]
    return AutoTokenizer.from_pretrained(name, **kwargs)


class _HFLMEncoding:
    """Just enough of an HFLM for lm-eval's own encoding methods to run without a model."""

    backend = "causal"

    def __init__(self, tokenizer: Any, add_bos_token: bool | None, prefix_token_id: int | None = None):
        from lm_eval.models.huggingface import HFLM

        self.tokenizer = tokenizer
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._tok_encode = HFLM.tok_encode
        self._encode_pair_fn = HFLM._encode_pair
        self._prefix = HFLM.prefix_token_id.fget

    @property
    def prefix_token_id(self) -> int:
        return self._prefix(self)

    def tok_encode(self, string: str, **kwargs: Any) -> list[int]:
        return self._tok_encode(self, string, **kwargs)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return self._encode_pair_fn(self, context, continuation)


def split_first_token(text: str, tokenizer: Any, add_bos_token: bool | None = None) -> tuple[str, str, int]:
    """(context, continuation, n_scored) such that lm-eval's HF loglikelihood request (context, continuation)
    runs the model on exactly tokenizer(text, add_special_tokens=False) and scores tokens 2..n."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < 2:
        raise ValueError(f"has {len(ids)} token(s); the paper's metric scores tokens 2..n, so it needs at least 2")
    encoding = _HFLMEncoding(tokenizer, add_bos_token)
    if encoding.tok_encode(text) != ids:
        raise ValueError(
            "lm-eval's HF model would add special tokens (e.g. BOS) to this sentence, but the paper scores it "
            "without them: pass add_bos_token=False in --model_args"
        )
    for cut in _candidate_cuts(text, tokenizer, ids):
        context, continuation = text[:cut], text[cut:]
        if not context.strip():
            continue  # lm-eval moves trailing whitespace into the continuation; an empty context means BOS
        context_ids, continuation_ids = encoding.encode_pair(context, continuation)
        if context_ids == ids[:1] and continuation_ids == ids[1:]:
            return context, continuation, len(continuation_ids)
    raise ValueError(
        f"its first token {tokenizer.convert_ids_to_tokens(ids[:1])[0]!r} is not a text prefix that lm-eval "
        "can pass as a context on its own (e.g. it is whitespace only), so lm-eval cannot score the sentence "
        "the paper's way; strip leading whitespace from the corpus, or use prune_plugin.perplexity directly"
    )


def _candidate_cuts(text: str, tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Character offsets where the first token may end: from the fast tokenizer's offsets, else a short scan."""
    cuts: list[int] = []
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cuts += [offsets[0][1], offsets[1][0]]
    cuts += range(1, min(len(text), 64) + 1)
    return list(dict.fromkeys(cut for cut in cuts if 0 < cut < len(text)))


def provisional_docs(sentences: Sequence[str], reason: str) -> list[dict]:
    """Docs for a task built without a tokenizer (lm-eval's model-free task checks, `lm_eval ls`): each sentence
    split after its first word, a valid request that is never scored; scoring one raises `reason`."""
    docs = []
    for text in sentences:
        stripped = text.lstrip()
        cut = len(text) - len(stripped) + (stripped.find(" ") if " " in stripped else len(stripped) // 2 or 1)
        docs.append({"text": text, "context": text[:cut], "continuation": text[cut:], "n_scored": 0,
                     "unscored_reason": reason})
    return docs


def paper_ppl_docs(sentences: Sequence[str], tokenizer: Any, add_bos_token: bool | None = None,
                   source: str = "<sentences>") -> list[dict]:
    """One lm-eval doc per sentence: text, context, continuation, n_scored."""
    docs = []
    for index, text in enumerate(sentences):
        try:
            context, continuation, n_scored = split_first_token(text, tokenizer, add_bos_token)
        except ValueError as err:
            raise ValueError(f"{source}: record {index}, field 'Text': {err}") from None
        docs.append({"text": text, "context": context, "continuation": continuation, "n_scored": n_scored,
                     "unscored_reason": ""})
    return docs
